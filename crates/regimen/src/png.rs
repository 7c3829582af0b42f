//! A minimal PNG writer (8-bit RGB, one zlib stream) and a tiny bitmap font for labels, so
//! previews need no image or font dependency.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

fn crc32(bytes: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (n, t) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An RGB canvas.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: [u8; 3]) -> Canvas {
        Canvas {
            width,
            height,
            rgb: background
                .iter()
                .copied()
                .cycle()
                .take(width * height * 3)
                .collect(),
        }
    }

    pub fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Draw a `[C, H, W]` image with values in [0, 1] (1 or 3 channels) at `(x0, y0)`, each
    /// pixel as a `scale x scale` block.
    pub fn image(&mut self, img: &[f32], shape: [usize; 3], x0: usize, y0: usize, scale: usize) {
        let [c, h, w] = shape;
        let byte = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| byte(img[ch.min(c - 1) * h * w + y * w + x]);
                let color = [px(0), px(1), px(2)];
                for dy in 0..scale {
                    for dx in 0..scale {
                        self.set(x0 + x * scale + dx, y0 + y * scale + dy, color);
                    }
                }
            }
        }
    }

    /// Write `text` (digits, `.`, `:`, `%`, `-`, space) with the 3x5 font, each dot `scale` pixels.
    pub fn text(&mut self, text: &str, x0: usize, y0: usize, scale: usize, color: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    x0 + (k * 4 + col) * scale + dx,
                                    y0 + row * scale + dy,
                                    color,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Write the canvas as a PNG file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.rgb.chunks(self.width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)
            .and_then(|_| z.flush())
            .map_err(|source| Error::Io {
                context: "compressing the PNG".into(),
                source,
            })?;
        let idat = z.finish().map_err(|source| Error::Io {
            context: "compressing the PNG".into(),
            source,
        })?;
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &idat);
        chunk(&mut png, b"IEND", &[]);
        crate::io::write_atomic(path, &png)
    }
}

/// 3x5 glyphs, one row per entry, 3 bits each (high bit left).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        ':' => [0, 0b010, 0, 0b010, 0],
        '-' => [0, 0, 0b111, 0, 0],
        '%' => [0b101, 0b001, 0b010, 0b100, 0b101],
        _ => [0; 5],
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc_matches_the_png_reference() {
        // CRC-32 of "IEND" is the constant every PNG ends with.
        assert_eq!(super::crc32(b"IEND"), 0xAE42_6082);
    }
}

/// A decoded image: `channels` (1 gray, 3 RGB) planes of `height x width` values in `[0, 1]`,
/// row-major per plane (`[C, H, W]`), alpha dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

/// Decode a PNG (non-interlaced; gray, gray+alpha, RGB, RGBA or palette; 1 to 16 bits). Every
/// size is checked against the bytes present before allocation; an unsupported or damaged
/// file is an error naming `name` and what is wrong.
pub fn decode(bytes: &[u8], name: &str) -> Result<Image> {
    use std::io::Read;
    let bad = |reason: String| Error::Data {
        file: name.to_string(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" {
        return Err(bad("not a PNG file (bad signature)".into()));
    }
    let (mut pos, mut ihdr, mut palette, mut idat) = (8usize, None, Vec::new(), Vec::new());
    loop {
        if pos + 8 > bytes.len() {
            return Err(bad("truncated (no IEND chunk)".into()));
        }
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let Some(data) = bytes.get(pos + 8..pos + 8 + len) else {
            return Err(bad(format!(
                "chunk {:?} runs past the end of the file",
                String::from_utf8_lossy(kind)
            )));
        };
        match kind {
            b"IHDR" => {
                if len != 13 {
                    return Err(bad("bad IHDR chunk".into()));
                }
                let be = |i: usize| {
                    u32::from_be_bytes(data[i..i + 4].try_into().expect("4 bytes")) as usize
                };
                ihdr = Some((be(0), be(4), data[8], data[9], data[12]));
            }
            b"PLTE" => palette = data.to_vec(),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    let Some((width, height, depth, color, interlace)) = ihdr else {
        return Err(bad("no IHDR chunk".into()));
    };
    if interlace != 0 {
        return Err(bad(
            "interlaced PNGs are not supported: save it without interlacing".into(),
        ));
    }
    let samples = match color {
        0 => 1,
        2 => 3,
        3 => 1,
        4 => 2,
        6 => 4,
        c => return Err(bad(format!("unknown color type {c}"))),
    };
    if ![1, 2, 4, 8, 16].contains(&depth)
        || (color != 0 && color != 3 && depth < 8)
        || (color == 3 && depth == 16)
    {
        return Err(bad(format!(
            "unsupported bit depth {depth} for color type {color}"
        )));
    }
    if width == 0 || height == 0 || width > 1 << 14 || height > 1 << 14 {
        return Err(bad(format!(
            "unsupported size {width}x{height} (at most 16384x16384)"
        )));
    }
    let stride = (width * samples * depth as usize).div_ceil(8);
    let expected = (stride + 1) * height;
    // Inflate no more than the image needs (a small file cannot expand without bound).
    let mut raw = Vec::with_capacity(expected.min(64 << 20));
    flate2::read::ZlibDecoder::new(&idat[..])
        .take(expected as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| bad(format!("bad compressed data: {e}")))?;
    if raw.len() != expected {
        return Err(bad(format!(
            "the image data holds {} bytes, {width}x{height} needs {expected}",
            raw.len()
        )));
    }
    // Undo the filters, row by row.
    let bpp = (samples * depth as usize).div_ceil(8);
    let mut prev = vec![0u8; stride];
    let mut out = Vec::with_capacity(stride * height);
    for r in 0..height {
        let filter = raw[r * (stride + 1)];
        let mut row = raw[r * (stride + 1) + 1..(r + 1) * (stride + 1)].to_vec();
        for i in 0..stride {
            let a = if i >= bpp { row[i - bpp] as i32 } else { 0 };
            let b = prev[i] as i32;
            let c = if i >= bpp { prev[i - bpp] as i32 } else { 0 };
            let add = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => return Err(bad(format!("unknown filter {f} in row {r}"))),
            };
            row[i] = row[i].wrapping_add(add as u8);
        }
        out.extend_from_slice(&row);
        prev = row;
    }
    // Samples to [0, 1].
    let max = ((1u32 << depth) - 1) as f32;
    let sample = |r: usize, i: usize| -> u32 {
        let row = &out[r * stride..(r + 1) * stride];
        match depth {
            16 => u16::from_be_bytes([row[2 * i], row[2 * i + 1]]) as u32,
            8 => row[i] as u32,
            d => {
                let bit = i * d as usize;
                ((row[bit / 8] >> (8 - d as usize - bit % 8)) & ((1 << d) - 1) as u8) as u32
            }
        }
    };
    let channels = if color == 0 || color == 4 { 1 } else { 3 };
    let mut pixels = vec![0f32; channels * height * width];
    let plane = height * width;
    for y in 0..height {
        for x in 0..width {
            let o = y * width + x;
            if color == 3 {
                let idx = sample(y, x) as usize;
                let Some(rgb) = palette.get(3 * idx..3 * idx + 3) else {
                    return Err(bad(format!("palette index {idx} out of the palette")));
                };
                for ch in 0..3 {
                    pixels[ch * plane + o] = rgb[ch] as f32 / 255.0;
                }
            } else {
                for ch in 0..channels {
                    pixels[ch * plane + o] = sample(y, x * samples + ch) as f32 / max;
                }
            }
        }
    }
    Ok(Image {
        channels,
        height,
        width,
        pixels,
    })
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[test]
    fn decode_reads_what_save_writes() {
        let mut c = Canvas::new(5, 3, [10, 20, 30]);
        c.set(4, 2, [255, 0, 128]);
        let dir = std::env::temp_dir().join(format!("regimen-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.png");
        c.save(&p).unwrap();
        let img = decode(&std::fs::read(&p).unwrap(), "x.png").unwrap();
        assert_eq!((img.channels, img.height, img.width), (3, 3, 5));
        assert_eq!(img.pixels[0], 10.0 / 255.0);
        assert_eq!(img.pixels[15 + 14], 0.0); // green of (4, 2)
        assert_eq!(img.pixels[30 + 14], 128.0 / 255.0);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(decode(b"\x89PNG\r\n\x1a\nxx", "y.png")
            .unwrap_err()
            .to_string()
            .contains("y.png"));
    }
}
