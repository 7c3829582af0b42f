//! CIFAR-10 binary batches (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`):
//! records of 1 label byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32
//! row-major), 10,000 records a file.

use std::path::Path;

use crate::error::{Error, Result};

pub const RECORD: usize = 1 + 3 * 32 * 32;

/// A batch file holds 10,000 records; at most this many are read (a bigger file is not one).
pub const MAX_RECORDS: usize = 60_000;

/// `(pixels [N, 3, 32, 32] as bytes, labels)` of one batch file.
pub fn read_batch(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let size = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?
        .len();
    if size > (MAX_RECORDS * RECORD) as u64 {
        return Err(Error::Data {
            file: path.display().to_string(),
            reason: format!(
                "{size} bytes: a CIFAR-10 batch has 10,000 records of {RECORD} bytes (at most {MAX_RECORDS} are accepted)"
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let bad = |reason: String| Error::Data {
        file: path.display().to_string(),
        reason,
    };
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(bad(format!("{} bytes is not a whole number of {RECORD}-byte records (truncated or not a CIFAR-10 batch)", bytes.len())));
    }
    let n = bytes.len() / RECORD;
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(bad(format!(
                "record {i}: label {} out of range 0..=9",
                rec[0]
            )));
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((pixels, labels))
}
