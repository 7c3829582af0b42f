//! The CUDA backend's batch-building kernels (`backend/cuda/kernels.cu`: `gather_augment`,
//! `one_hot`, `augment_samples` for crop, translate, flip, scale, rotate, noise and Cutout,
//! `mix_params` + `mix_batch` for Mixup and CutMix) run on the CPU and held to the CPU
//! backend, bit for bit, so that their indexing and their draws are proven on machines
//! without a GPU. `kernels.cu` is plain C++ behind `__CUDACC__`; the C++ compiler builds it
//! with `tests/emulate/shim.h` (each block's threads as host threads) and
//! `tests/emulate/augment_main.cpp`, which launches the kernels with the backend's grids.
//!
//! Exact equality holds here because both sides run on this CPU with its `log`, `exp`, `cos`,
//! `sin` and `pow` and the kernels round every operation explicitly as the host code does; on
//! a GPU the same comparison (`tests/conformance.rs`) allows CUDA's math functions their last
//! bits. Without a C++ compiler the test says it skipped.

use regimen::backend::RandomKey;
use regimen::data::Augment;
use regimen::rng::purpose::{AUGMENT, AUGMENT_STEP};
use regimen::{DType, Device, Indices, Rng, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

mod emulate;
use emulate::{read, read_u32, write};

const KERNELS: &str = include_str!("../src/backend/cuda/kernels.cu");
const MAIN: &str = include_str!("emulate/augment_main.cpp");

const STREAM: u64 = 0xA06_5EED_0000_0017;
// Dataset size, batch, channels, height, width.
const N: usize = 23;
const B: usize = 9;
const C: usize = 2;
const H: usize = 10;
const W: usize = 12;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// Runs the emulator on `args`, panicking with its stderr if it fails.
fn emu(exe: &Path, dir: &Path, args: &[String]) {
    let out = Command::new(exe).arg(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "the emulator failed on {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}[{i}]: emulated GPU kernel {g} vs CPU {w}"
        );
    }
}

struct Emu {
    exe: PathBuf,
    dir: PathBuf,
}

impl Emu {
    fn new() -> Option<Emu> {
        let dir = std::env::temp_dir().join(format!("regimen-kernels-emu-{}", std::process::id()));
        let exe = emulate::build(
            &dir,
            "aug_emu",
            &[("kernels.cu", KERNELS), ("augment_main.cpp", MAIN)],
            "kernels.cu",
        )?;
        Some(Emu { exe, dir })
    }

    fn run(&self, args: Vec<String>) {
        emu(&self.exe, &self.dir, &args);
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dataset the gather reads: images, labels, and a shuffled order.
fn dataset() -> (Vec<f32>, Vec<u32>, Vec<u32>) {
    let images = randn(N * C * H * W, 60);
    let labels: Vec<u32> = (0..N as u32).map(|i| (i * 7) % 10).collect();
    let order: Vec<u32> = (0..N as u32).map(|i| (i * 5 + 3) % N as u32).collect();
    (images, labels, order)
}

/// The CPU backend's gathered batch (crop `pad`, flip `flip_p`) at `step`, from cursor 4.
fn cpu_gather(step: u32, pad: usize, flip_p: f32) -> (Tensor, Indices) {
    let d = Device::Cpu;
    let be = d.backend();
    let (images, labels, order) = dataset();
    let images = Tensor::from_host(&[N, C, H, W], images, d).unwrap();
    let labels = Indices::from_host(labels, d);
    let order = Indices::from_host(order, d);
    let cursor = Indices::from_host(vec![4], d);
    let s = Indices::from_host(vec![step], d);
    let key = RandomKey {
        stream: STREAM,
        step: &s,
        purpose: AUGMENT,
    };
    let mut x = be.alloc(&[B, C, H, W], DType::F32);
    let mut y = Indices::zeros(B, d);
    be.gather_augment(
        &images, &labels, &order, &cursor, &mut x, &mut y, pad, flip_p, key,
    );
    (x, y)
}

fn strings(v: &[&dyn std::fmt::Display]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn the_batch_kernels_match_the_cpu_bit_for_bit() {
    let Some(e) = Emu::new() else { return };
    let (images, labels, order) = dataset();
    write(&e.dir, "images.bin", &images);
    write(&e.dir, "labels.bin", &labels);
    write(&e.dir, "order.bin", &order);

    // The gather, with and without crop and flip, at two steps (different draws).
    for (step, pad, flip_p) in [(7u32, 3usize, 0.5f32), (8, 0, 0.0), (9, 1, 1.0)] {
        let (x, y) = cpu_gather(step, pad, flip_p);
        e.run(strings(&[
            &"gather",
            &N,
            &B,
            &C,
            &H,
            &W,
            &pad,
            &flip_p.to_bits(),
            &STREAM,
            &step,
            &AUGMENT,
            &4,
        ]));
        let what = format!("gather, step {step}, crop {pad}, flip {flip_p}");
        exact(
            &format!("{what}: images"),
            &read(&e.dir, "x.out"),
            &x.to_vec(),
        );
        assert_eq!(read_u32(&e.dir, "labels.out"), y.to_vec(), "{what}: labels");
    }

    // One-hot labels of a gathered batch.
    let (_, y) = cpu_gather(8, 3, 0.5);
    let mut soft = Device::Cpu.backend().zeros(&[B, 10], DType::F32);
    Device::Cpu.backend().one_hot(&y, &mut soft);
    write(&e.dir, "labels.bin", &y.to_vec());
    e.run(strings(&[&"one_hot", &B, &10]));
    exact("one-hot labels", &read(&e.dir, "soft.out"), &soft.to_vec());

    // The per-image steps, each kind at two steps, on a gathered batch.
    for (a, kind, p) in [
        (Augment::Crop { pad: 3 }, 0, 3.0f32),
        (Augment::Translate { pixels: 2 }, 0, 2.0),
        (Augment::Flip { p: 0.5 }, 1, 0.5),
        (Augment::Scale { min_area: 0.4 }, 2, 0.4),
        (Augment::Rotate { degrees: 25.0 }, 3, 25.0),
        (Augment::Noise { std: 0.3 }, 4, 0.3),
        (Augment::Cutout { size: 5 }, 5, 5.0),
    ] {
        for step in [8u32, 9] {
            let (mut x, _) = cpu_gather(step, 3, 0.5);
            write(&e.dir, "x.bin", &x.to_vec());
            let s = Indices::from_host(vec![step], Device::Cpu);
            let purpose = AUGMENT_STEP + 2;
            let key = RandomKey {
                stream: STREAM,
                step: &s,
                purpose,
            };
            Device::Cpu.backend().augment_samples(&mut x, a, key);
            e.run(strings(&[
                &"samples",
                &kind,
                &p.to_bits(),
                &B,
                &C,
                &H,
                &W,
                &STREAM,
                &step,
                &purpose,
            ]));
            exact(
                &format!("{a:?}, step {step}"),
                &read(&e.dir, "x.out"),
                &x.to_vec(),
            );
        }
    }

    // Mixup and CutMix: the Beta draw and the box on one thread, then the pairs; an odd batch
    // (its middle sample pairs with itself). Alphas below and above 1 take both branches of
    // the Gamma sampler.
    for (alpha, cutmix) in [(0.3f32, false), (2.5, false), (1.0, true), (0.5, true)] {
        for step in 0..6u32 {
            let d = Device::Cpu;
            let be = d.backend();
            let (mut x, y) = cpu_gather(step, 3, 0.5);
            let mut soft = be.zeros(&[B, 10], DType::F32);
            be.one_hot(&y, &mut soft);
            write(&e.dir, "x.bin", &x.to_vec());
            write(&e.dir, "soft.bin", &soft.to_vec());
            let s = Indices::from_host(vec![step], d);
            let purpose = AUGMENT_STEP + 1;
            let key = RandomKey {
                stream: STREAM,
                step: &s,
                purpose,
            };
            be.mix_batch(&mut x, &mut soft, alpha, cutmix, key);
            e.run(strings(&[
                &"mix",
                &alpha.to_bits(),
                &(cutmix as i32),
                &B,
                &10,
                &C,
                &H,
                &W,
                &STREAM,
                &step,
                &purpose,
            ]));
            let what = format!("mix alpha {alpha}, cutmix {cutmix}, step {step}");
            exact(
                &format!("{what}: images"),
                &read(&e.dir, "x.out"),
                &x.to_vec(),
            );
            exact(
                &format!("{what}: soft labels"),
                &read(&e.dir, "soft.out"),
                &soft.to_vec(),
            );
        }
    }
}
