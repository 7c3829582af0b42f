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
