//! Building and feeding the CPU emulators of the CUDA kernels (`shim.h` and a `*_main.cpp`
//! driver), shared by `conv_emulated.rs` and `kernels_emulated.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const SHIM: &str = include_str!("shim.h");

/// Raw little-endian 4-byte values (f32 or u32) to `dir/name`.
pub fn write<T: Copy + Into<Raw>>(dir: &Path, name: &str, v: &[T]) {
    let bytes: Vec<u8> = v.iter().flat_map(|&x| x.into().0).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// Four little-endian bytes.
pub struct Raw([u8; 4]);
impl From<f32> for Raw {
    fn from(v: f32) -> Raw {
        Raw(v.to_le_bytes())
    }
}
impl From<u32> for Raw {
    fn from(v: u32) -> Raw {
        Raw(v.to_le_bytes())
    }
}

pub fn read(dir: &Path, name: &str) -> Vec<f32> {
    read_u32(dir, name)
        .into_iter()
        .map(f32::from_bits)
        .collect()
}

pub fn read_u32(dir: &Path, name: &str) -> Vec<u32> {
    std::fs::read(dir.join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The emulator `exe` built in `dir` from `sources` (name, text; the last one the driver with
/// `main`) and the shim, or `None` when there is no C++ compiler (`$CXX`, else `c++`). Built
/// with `-ffp-contract=off`: each f32/f64 operation is one IEEE operation, as the kernels'
/// explicitly rounded ones are on the GPU.
pub fn build(dir: &Path, exe: &str, sources: &[(&str, &str)], what: &str) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        eprintln!("{what} emulation skipped: no C++ compiler ({cxx})");
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("shim.h"), SHIM).unwrap();
    for (name, text) in sources {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let path = dir.join(exe);
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-ffp-contract=off",
            "-Wall",
            "-Werror",
            "-Wno-unknown-pragmas",
            // kernels.cu compares unsigned plane indices with int sizes; the barrier pointer
            // the kernels' __syncthreads reach is set by each launch.
            "-Wno-sign-compare",
            "-Wno-nonnull",
            "-o",
        ])
        .arg(&path)
        .arg(dir.join(sources.last().expect("a driver").0))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} does not build for the emulator:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(path)
}
