//! Downloading a dataset on request, checked by SHA-256.
//!
//! Only `fashion-mnist` has an official plain-HTTP location (Zalando Research's bucket,
//! [`FASHION_MNIST_URL`]); any base URL can be given instead (a mirror, or a server on
//! 127.0.0.1 in the tests). Each file is fetched with a minimal HTTP/1.1 GET over a TCP
//! socket (no TLS: `https://` is refused with a clear error), hashed, compared with the
//! published SHA-256, and only then renamed into place, so a failed or tampered download never
//! leaves a file that looks complete.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

pub const FASHION_MNIST_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com";

/// The four Fashion-MNIST files and their SHA-256 (the files Zalando publishes).
pub const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    ),
];

/// At most this many bytes per file (the largest Fashion-MNIST file is 26 MB).
const MAX_BYTES: usize = 256 << 20;

fn net(url: &str, reason: impl std::fmt::Display) -> Error {
    Error::Data {
        file: url.to_string(),
        reason: reason.to_string(),
    }
}

/// GET `url` (`http://host[:port]/path`) and return the body.
pub fn http_get(url: &str) -> Result<Vec<u8>> {
    let rest = url.strip_prefix("http://").ok_or_else(|| net(url, "only http:// URLs are supported (no TLS in regimen); use a plain-HTTP mirror or copy the files and pass --data-dir"))?;
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".to_string()));
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    // RFC 7230: the Host header carries the port when it is not the default.
    let host = hostport;
    let mut stream = TcpStream::connect(&addr)
        .map_err(|e| net(url, format!("cannot connect to {addr}: {e}")))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: regimen\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| net(url, e))?;
    let mut r = BufReader::new(stream);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| net(url, e))?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| net(url, format!("not an HTTP response: {:?}", status.trim())))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| net(url, e))? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if code != 200 {
        return Err(net(url, format!("HTTP status {}", status.trim())));
    }
    if length.is_some_and(|n| n > MAX_BYTES) {
        return Err(net(
            url,
            format!(
                "refusing a {} byte file (more than {MAX_BYTES})",
                length.unwrap()
            ),
        ));
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| net(url, e))?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| net(url, "bad chunked encoding"))?;
            if n == 0 {
                break;
            }
            if body.len() + n > MAX_BYTES {
                return Err(net(url, "file too large"));
            }
            let start = body.len();
            body.resize(start + n, 0);
            r.read_exact(&mut body[start..])
                .map_err(|e| net(url, format!("truncated: {e}")))?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).map_err(|e| net(url, e))?;
        }
    } else {
        r.take(MAX_BYTES as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| net(url, format!("while reading: {e}")))?;
        if body.len() > MAX_BYTES {
            return Err(net(
                url,
                format!("refusing a file of more than {MAX_BYTES} bytes"),
            ));
        }
        if let Some(n) = length {
            if body.len() != n {
                return Err(net(
                    url,
                    format!("truncated: {} of the {n} bytes announced", body.len()),
                ));
            }
        }
    }
    Ok(body)
}

/// Download `files` (name, SHA-256 hex) from `base_url` into `dir`, skipping files already
/// there with the right hash. Returns the paths.
pub fn download(
    base_url: &str,
    files: &[(&str, &str)],
    dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    let mut out = Vec::new();
    for (name, want) in files {
        let path = dir.join(name);
        if path.is_file()
            && std::fs::read(&path)
                .map(|b| sha256_hex(&b) == *want)
                .unwrap_or(false)
        {
            progress(&format!("{name}: already present, checksum ok"));
            out.push(path);
            continue;
        }
        let url = format!("{}/{name}", base_url.trim_end_matches('/'));
        progress(&format!("{name}: downloading {url}"));
        let body = http_get(&url)?;
        let got = sha256_hex(&body);
        if got != *want {
            return Err(Error::Data {
                file: url,
                reason: format!(
                    "SHA-256 mismatch: got {got}, expected {want} ({} bytes); nothing was written",
                    body.len()
                ),
            });
        }
        let tmp = dir.join(format!("{name}.part"));
        std::fs::write(&tmp, &body).map_err(|source| Error::Io {
            context: format!("writing {}", tmp.display()),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
            context: format!("renaming into {}", path.display()),
            source,
        })?;
        progress(&format!("{name}: {} bytes, checksum ok", body.len()));
        out.push(path);
    }
    Ok(out)
}

/// SHA-256 (FIPS 180-4) as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256(data).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two blocks (FIPS 180-4 example).
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }
}
