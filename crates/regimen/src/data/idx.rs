//! IDX files (the MNIST and Fashion-MNIST format), raw or gzip'd.
//!
//! Layout: a 4-byte magic `0x00 0x00 <type> <ndims>` (type `0x08` = unsigned byte), then
//! `ndims` big-endian u32 dimensions, then the data, row-major. Images are 3-D
//! (`[N, H, W]`), labels 1-D (`[N]`).
//!
//! The header is read and checked before anything is allocated: wrong magic, absurd sizes,
//! short data and trailing bytes are errors that name the file. Gzip is detected by its own
//! magic (`1f 8b`), whatever the file is called.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

/// At most this many images and this many pixels per side: larger headers are corrupt.
const MAX_ITEMS: usize = 10_000_000;
const MAX_SIDE: usize = 4096;
const MAX_BYTES: usize = 1 << 32;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Data {
        file: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Open `path`, transparently decompressing gzip.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Read>> {
    let mut f = File::open(path).map_err(|source| Error::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let f = File::open(path).map_err(|source| Error::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        // Several gzip members one after the other are one valid file (`cat a.gz b.gz`).
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
    } else {
        Box::new(BufReader::new(f))
    })
}

/// Read exactly `buf.len()` bytes, or explain how many were there.
fn read_exact(r: &mut dyn Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(bad(
                    path,
                    format!(
                        "truncated: {what} needs {} bytes, the file has {got}",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(path, format!("cannot read {what}: {e}"))),
        }
    }
    Ok(())
}

/// The dimensions of an unsigned-byte IDX file with `ndims` dimensions, checked.
fn header(r: &mut dyn Read, path: &Path, ndims: u8) -> Result<Vec<usize>> {
    let mut magic = [0u8; 4];
    read_exact(r, &mut magic, path, "the header")?;
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] != ndims {
        return Err(bad(
            path,
            format!(
                "bad magic number {:02x}{:02x}{:02x}{:02x}: expected 000008{:02x} (unsigned bytes, {ndims} dimensions) — is this the right file?",
                magic[0], magic[1], magic[2], magic[3], ndims
            ),
        ));
    }
    let mut dims = vec![0u8; 4 * ndims as usize];
    read_exact(r, &mut dims, path, "the dimensions")?;
    let dims: Vec<usize> = dims
        .chunks(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    if dims[0] == 0
        || dims[0] > MAX_ITEMS
        || dims[1..].iter().any(|&d| d == 0 || d > MAX_SIDE)
        || dims.iter().product::<usize>() > MAX_BYTES
    {
        return Err(bad(path, format!("absurd dimensions {dims:?} (at most {MAX_ITEMS} items of at most {MAX_SIDE} pixels a side)")));
    }
    Ok(dims)
}

/// The `len` bytes of data after the header. Nothing is allocated up front beyond what has
/// been read (a header may lie about the size): the buffer grows as bytes arrive, in chunks of
/// at most 16 MiB.
fn body(r: &mut dyn Read, path: &Path, len: usize) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len.min(16 << 20));
    let got = r.take(len as u64).read_to_end(&mut data).map_err(|e| {
        bad(
            path,
            format!("corrupt data after {} bytes: {e}", data.len()),
        )
    })?;
    if got < len {
        return Err(bad(
            path,
            format!("truncated: the header announces {len} bytes of data, the file has {got}"),
        ));
    }
    // Anything after the data is an error: read on to tell a corrupt compressed stream (the
    // decoder fails) from plain trailing bytes.
    let mut extra = vec![0u8; 1 << 16];
    let mut more = 0usize;
    loop {
        match r.read(&mut extra) {
            Ok(0) => break,
            Ok(n) => {
                more += n;
                if more > len.max(1 << 20) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(path, format!("corrupt data: {e}"))),
        }
    }
    if more > 0 {
        return Err(bad(
            path,
            format!(
                "{more}{} bytes after the {len} bytes of data the header announces",
                if more > len.max(1 << 20) { "+" } else { "" }
            ),
        ));
    }
    Ok(data)
}

/// `(pixels, n, height, width)` of an images file.
pub fn read_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let mut r = open(path)?;
    let d = header(r.as_mut(), path, 3)?;
    let data = body(r.as_mut(), path, d[0] * d[1] * d[2])?;
    Ok((data, d[0], d[1], d[2]))
}

/// The labels of a labels file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let mut r = open(path)?;
    let d = header(r.as_mut(), path, 1)?;
    body(r.as_mut(), path, d[0])
}

/// Write an uncompressed IDX file (tests and tools).
pub fn write(path: &Path, dims: &[usize], data: &[u8]) -> std::io::Result<()> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    std::fs::write(path, out)
}
