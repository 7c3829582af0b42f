//! Downloading with a SHA-256 check, against an HTTP server on 127.0.0.1 run by the test.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use regimen::data::download::{download, sha256_hex, FASHION_MNIST_FILES};

/// Serve `files` (path -> body) for at most `max_requests` requests; returns the base URL.
fn serve(files: HashMap<String, Vec<u8>>, max_requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_requests) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let mut r = BufReader::new(stream.try_clone().unwrap());
            r.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            match files.get(&path) {
                Some(body) => {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .unwrap();
                    stream.write_all(body).unwrap();
                }
                None => write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap(),
            }
        }
    });
    format!("http://{addr}")
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("regimen-dl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn downloads_are_checked_and_atomic() {
    let good = b"some dataset bytes".to_vec();
    let hash = sha256_hex(&good);
    let files = HashMap::from([
        ("/data/a.bin".to_string(), good.clone()),
        ("/data/b.bin".to_string(), b"tampered".to_vec()),
    ]);
    let base = serve(files, 10);
    let dir = tmpdir("checked");
    let mut log = Vec::new();
    let paths = download(&format!("{base}/data"), &[("a.bin", &hash)], &dir, |m| {
        log.push(m.to_string())
    })
    .unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), good);
    assert!(log.iter().any(|l| l.contains("checksum ok")), "{log:?}");
    // Present with the right hash: not fetched again.
    download(&format!("{base}/data"), &[("a.bin", &hash)], &dir, |m| {
        log.push(m.to_string())
    })
    .unwrap();
    assert!(log.last().unwrap().contains("already present"));
    // A file whose hash differs is refused and nothing is left behind.
    let err = download(&format!("{base}/data"), &[("b.bin", &hash)], &dir, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("b.bin") && err.contains("SHA-256 mismatch"),
        "{err}"
    );
    assert!(!dir.join("b.bin").exists() && !dir.join("b.bin.part").exists());
    let err = download(
        &format!("{base}/data"),
        &[("missing.bin", &hash)],
        &dir,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("404"), "{err}");
    let err = download("https://example.org", &[("c.bin", &hash)], &dir, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("only http://"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fashion_mnist_from_a_local_mirror_matches_the_published_checksums() {
    let installed = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    if !installed.join("train-labels-idx1-ubyte.gz").is_file() {
        eprintln!("Fashion-MNIST is not installed: skipped");
        return;
    }
    // Serve the installed files as if they were the official location, then load them.
    let files: HashMap<String, Vec<u8>> = FASHION_MNIST_FILES
        .iter()
        .map(|(n, _)| (format!("/{n}"), std::fs::read(installed.join(n)).unwrap()))
        .collect();
    let base = serve(files, 8);
    let root = tmpdir("fmnist");
    download(
        &base,
        &FASHION_MNIST_FILES,
        &root.join("fashion-mnist"),
        |_| {},
    )
    .unwrap();
    let s = regimen::data::load("fashion-mnist", Some(&root)).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
    std::fs::remove_dir_all(&root).ok();
}
