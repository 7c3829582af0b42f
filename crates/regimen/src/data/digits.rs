//! The UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998;
//! CC BY 4.0): 1,797 grey images of 8x8 pixels with values 0..16, ten classes. Embedded in
//! the crate (57 KB gzip'd) so that training, tests and examples run with nothing installed.

use std::io::Read;

use super::Dataset;
use crate::error::{Error, Result};

const DIGITS_CSV_GZ: &[u8] = include_bytes!("digits.csv.gz");

/// All 1,797 samples, pixels scaled to `[0, 1]` (divided by 16), shape `[1, 8, 8]`.
pub fn digits() -> Result<Dataset> {
    let file = "embedded digits.csv.gz";
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Data {
            file: file.into(),
            reason: format!("cannot decompress: {e}"),
        })?;
    let mut images = Vec::with_capacity(1797 * 64);
    let mut labels = Vec::with_capacity(1797);
    for (line_no, line) in text.lines().enumerate() {
        let values: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Data {
                file: file.into(),
                reason: format!("line {}: {e}", line_no + 1),
            })?;
        if values.len() != 65 || values[64] > 9 || values[..64].iter().any(|&v| v > 16) {
            return Err(Error::Data {
                file: file.into(),
                reason: format!(
                    "line {}: expected 64 pixels in 0..=16 and a label in 0..=9",
                    line_no + 1
                ),
            });
        }
        images.extend(values[..64].iter().map(|&v| v as f32 / 16.0));
        labels.push(values[64]);
    }
    Ok(Dataset {
        images,
        labels,
        image_shape: [1, 8, 8],
        class_names: (0..10).map(|d| d.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_digits_load_with_known_counts() {
        let d = super::digits().unwrap();
        assert_eq!(d.len(), 1797);
        let mut counts = [0usize; 10];
        d.labels.iter().for_each(|&l| counts[l as usize] += 1);
        // The class counts of the UCI test set.
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        // First image's pixel sum (raw values 0..16): 294.
        let s: f32 = d.images[..64].iter().sum::<f32>() * 16.0;
        assert_eq!(s.round() as i32, 294);
    }
}
