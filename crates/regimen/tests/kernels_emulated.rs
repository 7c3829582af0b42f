//! The CUDA backend's batch-building kernels (`backend/cuda/kernels.cu`: `gather_augment`,
//! `one_hot`, `augment_samples` for crop, translate, flip, scale, rotate, noise and Cutout,
//! `mix_params` + `mix_batch` for Mixup and CutMix) run on the CPU and held to the CPU
//! backend, bit for bit, so that their indexing and their draws are proven on machines
//! without a GPU; and batch norm's kernels, alone and followed in its own passes by a ReLU or
//! by a ReLU and a 2x2 max pool, held to the CPU backend's fused passes; and a linear layer's
//! bias forward and backward; and dropout's, the uniforms' and the Bernoulli keep mask's Philox
//! draws, bit for bit. `kernels.cu` is plain
//! C++ behind `__CUDACC__`; the C++ compiler builds it with `tests/emulate/shim.h` (each
//! block's threads as host threads) and `tests/emulate/kernels_main.cpp`, which launches the
//! kernels with the backend's grids.
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
const MAIN: &str = include_str!("emulate/kernels_main.cpp");

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
    /// The emulator built in a folder of its own for test `tag` (the tests run in parallel).
    fn new(tag: &str) -> Option<Emu> {
        let dir =
            std::env::temp_dir().join(format!("regimen-kernels-emu-{tag}-{}", std::process::id()));
        let exe = emulate::build(
            &dir,
            "aug_emu",
            &[("kernels.cu", KERNELS), ("kernels_main.cpp", MAIN)],
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
    let Some(e) = Emu::new("batch") else { return };
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

/// `|got - want| <= tol (1 + |want|)` everywhere (or both NaN).
fn near(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() && w.is_nan() {
            continue;
        }
        let allowed = tol * (1.0 + (w as f64).abs());
        assert!(
            (g as f64 - w as f64).abs() <= allowed,
            "{what}[{i}]: emulated GPU kernel {g} vs CPU {w} (allowed {allowed:.1e})"
        );
    }
}

/// Batch norm with batch statistics, alone (`after` 0), then a ReLU (1), then a ReLU and a 2x2
/// max pool of stride 2 (2), forward and backward, against the CPU backend's passes
/// (`norm.rs`). The backward is given the CPU's statistics, so both sides find the same ReLU
/// masks and pool maxima: a mask or an arg-max taken from the wrong place is an error of the
/// size of the gradient. A third of the pool's windows hold a tie (two equal values), where
/// the pool's rule (the first maximum) decides; odd sizes leave a row and a column outside
/// every window. The sums differ in order only (tolerance 1e-5, the gradients' 1e-4). Each
/// case again with x in bf16 (bf16 activations: the kernels' `_h` twins).
#[test]
fn the_batch_norm_kernels_match_the_cpu_fused_passes() {
    let Some(e) = Emu::new("norm") else { return };
    let d = Device::Cpu;
    let be = d.backend();
    let (eps, momentum) = (1e-5f32, 0.1f32);
    // (x shape, after, splits of the sums)
    // Features ([N, C]) take the row kernels (32 channels per block, 8 splits of rows).
    let cases: [(&[usize], usize, usize); 8] = [
        (&[3, 4, 7, 6], 2, 2),
        (&[2, 3, 8, 9], 2, 1),
        (&[5, 3, 4, 5], 1, 3),
        (&[6, 4], 1, 2),
        (&[4, 2, 5, 5], 0, 4),
        (&[1, 2, 2, 2], 2, 1),
        (&[19, 37], 0, 8),
        (&[3, 33], 1, 8),
    ];
    // Each in f32, then with x rounded to bf16 (bf16 activations: the `_h` kernels, y in bf16,
    // compared to the CPU's bf16 y within one bf16 step: both round to nearest even values
    // that differ only in the order of their sums).
    for (shape, after, splits, half) in cases
        .into_iter()
        .flat_map(|(s, a, k)| [(s, a, k, false), (s, a, k, true)])
    {
        let name = format!("{shape:?} after {after}, bf16 {half}");
        // (|got - want| <= 2^-8 |want| + 1e-6 in bf16: one step of its 8-bit significand.)
        let y_near = |what: &str, got: &[f32], want: &[f32]| {
            if !half {
                return near(
                    what,
                    got,
                    want,
                    if what.ends_with("evaluation") {
                        1e-6
                    } else {
                        1e-5
                    },
                );
            }
            assert_eq!(got.len(), want.len(), "{what}: lengths");
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let allowed = w.abs() / 256.0 + 1e-6;
                assert!(
                    (g - w).abs() <= allowed || (g.is_nan() && w.is_nan()),
                    "{what}[{i}]: emulated GPU kernel {g} vs CPU {w} (allowed {allowed:.1e})"
                );
            }
        };
        let (nb, c) = (shape[0], shape[1]);
        let (h, w) = if shape.len() == 4 {
            (shape[2], shape[3])
        } else {
            (1, 1)
        };
        let mut xv = randn(shape.iter().product(), 70 + after as u64);
        if after == 2 {
            // Ties: the window's first value repeated to its right or below it.
            for p in 0..nb * c {
                for (oy, ox) in (0..h / 2).flat_map(|oy| (0..w / 2).map(move |ox| (oy, ox))) {
                    let at = p * h * w + 2 * oy * w + 2 * ox;
                    match (oy + ox) % 3 {
                        0 => xv[at + 1] = xv[at],
                        1 => xv[at + w] = xv[at],
                        _ => {}
                    }
                }
            }
        }
        let gv: Vec<f32> = randn(c, 71).iter().map(|v| 1.0 + 0.3 * v).collect();
        let bv = randn(c, 72);
        let (rm0, rv0) = (randn(c, 73), vec![1.5f32; c]);
        let (dg0, db0) = (randn(c, 74), randn(c, 75));
        let t = |s: &[usize], v: &[f32]| Tensor::from_host(s, v.to_vec(), d).unwrap();
        let (x, gamma, beta) = (t(shape, &xv), t(&[c], &gv), t(&[c], &bv));
        let x = if half { x.to_dtype(DType::BF16) } else { x };
        let (mut rm, mut rv) = (t(&[c], &rm0), t(&[c], &rv0));
        let (y, mean, invstd) = match after {
            0 => be.batch_norm_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, momentum, eps),
            1 => {
                be.batch_norm_relu_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, momentum, eps)
            }
            _ => be
                .batch_norm_relu_pool_forward_train(
                    &x, &gamma, &beta, &mut rm, &mut rv, momentum, eps,
                )
                .expect("the CPU fuses the pool"),
        };
        let dyv = randn(y.numel(), 76);
        let dy = t(y.shape(), &dyv);
        let (mut dg, mut db) = (t(&[c], &dg0), t(&[c], &db0));
        let dx = match after {
            0 => be.batch_norm_backward(&x, &dy, &gamma, &mean, &invstd, true, &mut dg, &mut db),
            1 => be.batch_norm_relu_backward(
                &x, &y, &dy, &gamma, &beta, &mean, &invstd, &mut dg, &mut db,
            ),
            _ => be.batch_norm_relu_pool_backward(
                &x, &dy, &gamma, &beta, &mean, &invstd, &mut dg, &mut db,
            ),
        };
        for (f, v) in [
            ("x.bin", &xv),
            ("dy.bin", &dyv),
            ("gamma.bin", &gv),
            ("beta.bin", &bv),
            ("rm.bin", &rm0),
            ("rv.bin", &rv0),
            ("mean.bin", &mean.to_vec()),
            ("invstd.bin", &invstd.to_vec()),
            ("dgamma.bin", &dg0),
            ("dbeta.bin", &db0),
            ("eval_mean.bin", &rm0),
            ("eval_invstd.bin", &be.invstd(&t(&[c], &rv0), eps).to_vec()),
        ] {
            write(&e.dir, f, v);
        }
        e.run(strings(&[
            &"bn",
            &nb,
            &c,
            &h,
            &w,
            &after,
            &splits,
            &eps.to_bits(),
            &momentum.to_bits(),
            &u8::from(half),
        ]));
        let got = |f: &str| read(&e.dir, f);
        assert_eq!(y.dtype(), x.dtype(), "{name}: y in x's type");
        y_near(&format!("{name}: y"), &got("y.out"), &y.to_vec());
        near(
            &format!("{name}: mean"),
            &got("mean.out"),
            &mean.to_vec(),
            1e-5,
        );
        near(
            &format!("{name}: invstd"),
            &got("invstd.out"),
            &invstd.to_vec(),
            1e-5,
        );
        near(
            &format!("{name}: running mean"),
            &got("rm.out"),
            &rm.to_vec(),
            1e-5,
        );
        near(
            &format!("{name}: running var"),
            &got("rv.out"),
            &rv.to_vec(),
            1e-5,
        );
        near(&format!("{name}: dx"), &got("dx.out"), &dx.to_vec(), 1e-4);
        near(
            &format!("{name}: dgamma"),
            &got("dgamma.out"),
            &dg.to_vec(),
            1e-4,
        );
        near(
            &format!("{name}: dbeta"),
            &got("dbeta.out"),
            &db.to_vec(),
            1e-4,
        );
        // Evaluation with the running statistics as they were before this forward.
        let (rm_e, rv_e) = (t(&[c], &rm0), t(&[c], &rv0));
        let ye = be.batch_norm_forward_eval(&x, &gamma, &beta, &rm_e, &rv_e, eps);
        y_near(&format!("{name}: evaluation"), &got("ye.out"), &ye.to_vec());
    }
}

/// A linear layer's bias on `[rows, C]` (channels along the grid, 32 per block in backward):
/// the sum `y + b` exactly as the CPU's, the column sums of `dy` to the CPU's up to the order
/// of their f64 sums (1e-6); sizes that leave a partial block of channels and of row lanes.
/// The same for a linear layer followed by a ReLU (`Backend::bias_relu` and its backward:
/// the ReLU's output with and without a bias, and the mask, exactly; NaN and exact zeros in
/// the input), and by a ReLU and a dropout (`Backend::bias_relu_dropout`: the dropout's
/// Philox mask, exactly).
#[test]
fn the_linear_bias_kernels_match_the_cpu() {
    let Some(e) = Emu::new("bias") else { return };
    let d = Device::Cpu;
    let be = d.backend();
    for (rows, c) in [(512usize, 512usize), (13, 10), (1, 33), (300, 70)] {
        let (mut yv, bv, dyv, dbv) = (
            randn(rows * c, 80),
            randn(c, 81),
            randn(rows * c, 82),
            randn(c, 83),
        );
        yv[0] = f32::NAN;
        if yv.len() > 3 {
            yv[3] = -bv[3 % c];
            yv[2] = 0.0;
        }
        let step = Indices::from_host(vec![3], d);
        let fused = |bias: bool, dropout: bool| {
            let mut y = Tensor::from_host(&[rows, c], yv.clone(), d).unwrap();
            let b = Tensor::from_host(&[c], bv.clone(), d).unwrap();
            let (p, key) = (
                0.25f32,
                RandomKey {
                    stream: 77,
                    step: &step,
                    purpose: 1,
                },
            );
            let keep = if dropout {
                be.bias_relu_dropout(&mut y, bias.then_some(&b), c, p, key);
                1.0 / (1.0 - p)
            } else {
                be.bias_relu(&mut y, bias.then_some(&b), c);
                1.0
            };
            let dy = Tensor::from_host(&[rows, c], dyv.clone(), d).unwrap();
            let mut db = Tensor::from_host(&[c], dbv.clone(), d).unwrap();
            let dz = be.bias_relu_backward(&y, &dy, bias.then_some(&mut db), c, keep);
            (y.to_vec(), dz.to_vec(), db.to_vec())
        };
        // The backward from the dropout's output kept in bf16, as a linear layer keeps it
        // under bf16 activations.
        let half = || {
            let (yd, _, _) = fused(true, true);
            let y = Tensor::from_host(&[rows, c], yd, d)
                .unwrap()
                .to_dtype(DType::BF16);
            let dy = Tensor::from_host(&[rows, c], dyv.clone(), d).unwrap();
            let mut db = Tensor::from_host(&[c], dbv.clone(), d).unwrap();
            let dz = be.bias_relu_backward(&y, &dy, Some(&mut db), c, 1.0 / 0.75);
            (dz.to_vec(), db.to_vec())
        };
        let ((yr, dz, dbr), (yn, _, _)) = (fused(true, false), fused(false, false));
        let (yd, dzd, dbd) = fused(true, true);
        let (ydn, dzdn, _) = fused(false, true);
        let (dzh, dbh) = half();
        let dropped = yd.iter().zip(&yr).filter(|(d, r)| **d == 0.0 && **r > 0.0);
        assert!(
            dropped.count() > 0,
            "[{rows}, {c}]: the dropout dropped nothing"
        );
        let mut y = Tensor::from_host(&[rows, c], yv.clone(), d).unwrap();
        let b = Tensor::from_host(&[c], bv.clone(), d).unwrap();
        be.add_channel_bias(&mut y, &b, c);
        let dy = Tensor::from_host(&[rows, c], dyv.clone(), d).unwrap();
        let mut db = Tensor::from_host(&[c], dbv.clone(), d).unwrap();
        be.channel_bias_backward(&dy, &mut db, c);
        write(&e.dir, "y.bin", &yv);
        write(&e.dir, "b.bin", &bv);
        write(&e.dir, "dy.bin", &dyv);
        write(&e.dir, "db.bin", &dbv);
        e.run(strings(&[&"bias", &rows, &c]));
        exact(
            &format!("[{rows}, {c}] y + b"),
            &read(&e.dir, "y.out"),
            &y.to_vec(),
        );
        near(
            &format!("[{rows}, {c}] db"),
            &read(&e.dir, "db.out"),
            &db.to_vec(),
            1e-6,
        );
        exact(
            &format!("[{rows}, {c}] relu(y + b)"),
            &read(&e.dir, "yr.out"),
            &yr,
        );
        exact(
            &format!("[{rows}, {c}] relu(y)"),
            &read(&e.dir, "yn.out"),
            &yn,
        );
        exact(&format!("[{rows}, {c}] dz"), &read(&e.dir, "dz.out"), &dz);
        near(
            &format!("[{rows}, {c}] db after the ReLU"),
            &read(&e.dir, "dbr.out"),
            &dbr,
            1e-6,
        );
        exact(
            &format!("[{rows}, {c}] dropout(relu(y + b))"),
            &read(&e.dir, "yd.out"),
            &yd,
        );
        exact(
            &format!("[{rows}, {c}] dz, dropout"),
            &read(&e.dir, "dzd.out"),
            &dzd,
        );
        exact(
            &format!("[{rows}, {c}] dropout(relu(y))"),
            &read(&e.dir, "ydn.out"),
            &ydn,
        );
        exact(
            &format!("[{rows}, {c}] dz, dropout, no bias"),
            &read(&e.dir, "dzdn.out"),
            &dzdn,
        );
        near(
            &format!("[{rows}, {c}] db after the ReLU and dropout"),
            &read(&e.dir, "dbd.out"),
            &dbd,
            1e-6,
        );
        exact(
            &format!("[{rows}, {c}] dz from a bf16 y"),
            &read(&e.dir, "dzh.out"),
            &dzh,
        );
        near(
            &format!("[{rows}, {c}] db from a bf16 y"),
            &read(&e.dir, "dbh.out"),
            &dbh,
            1e-6,
        );
    }
}

/// Dropout, uniforms and Bernoulli keep masks from the Philox stream, a Philox block of four
/// draws per thread, bit for bit the CPU's: sizes ending inside a block, several blocks of
/// threads.
#[test]
fn the_philox_kernels_match_the_cpu_bit_for_bit() {
    let Some(e) = Emu::new("philox") else { return };
    let d = Device::Cpu;
    let be = d.backend();
    for (n, p, step, purpose) in [
        (1usize, 0.5f32, 3u32, 7u32),
        (1001, 0.3, 9, 1),
        (5003, 0.9, 0, 4),
    ] {
        let xv = randn(n, 90);
        let s = Indices::from_host(vec![step], d);
        let key = |purpose| RandomKey {
            stream: STREAM,
            step: &s,
            purpose,
        };
        let x = Tensor::from_host(&[n], xv.clone(), d).unwrap();
        let (y, mask) = be.dropout_forward(&x, p, key(purpose));
        let xh = x.to_dtype(DType::BF16);
        let (yh, maskh) = be.dropout_forward(&xh, p, key(purpose));
        assert_eq!(yh.dtype(), DType::BF16, "dropout hands on x's type");
        let uni = be.uniform(&[n], key(purpose + 1));
        let keep = be.bernoulli_keep(&[n], p, key(purpose + 2));
        write(&e.dir, "x.bin", &xv);
        e.run(strings(&[
            &"philox",
            &n,
            &p.to_bits(),
            &STREAM,
            &step,
            &purpose,
        ]));
        let name = format!("{n} draws, p {p}");
        exact(
            &format!("{name}: dropout"),
            &read(&e.dir, "y.out"),
            &y.to_vec(),
        );
        exact(
            &format!("{name}: mask"),
            &read(&e.dir, "mask.out"),
            &mask.to_vec(),
        );
        exact(
            &format!("{name}: dropout in bf16"),
            &read(&e.dir, "yh.out"),
            &yh.to_vec(),
        );
        exact(
            &format!("{name}: mask in bf16"),
            &read(&e.dir, "maskh.out"),
            &maskh.to_vec(),
        );
        exact(
            &format!("{name}: uniform"),
            &read(&e.dir, "uniform.out"),
            &uni.to_vec(),
        );
        exact(
            &format!("{name}: keep"),
            &read(&e.dir, "keep.out"),
            &keep.to_vec(),
        );
    }
}
