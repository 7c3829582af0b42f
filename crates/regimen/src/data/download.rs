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
        crate::io::write_atomic(&path, &body)?;
        progress(&format!("{name}: {} bytes, checksum ok", body.len()));
        out.push(path);
    }
    Ok(out)
}

/// The SHA-256 of `data` in lower-case hex (the `sha2` crate).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
