//! The implicit-GEMM convolution kernels of the CUDA backend (`backend/cuda/conv.cu`,
//! `REGIMEN_CONV=implicit`), run on the CPU and held to the CPU backend's convolution, so that
//! their indexing is proven on machines without a GPU. `conv.cu` is plain C++; the C++
//! compiler (`$CXX`, else `c++`) builds it with `tests/emulate/shim.h`, which runs each
//! block's 256 threads as host threads with a real barrier for `__syncthreads`, and
//! `tests/emulate/conv_main.cpp`, which launches the kernels as the backend does (the same
//! grids; several chunks for the weight gradient), with both tiles (64 x 128, and 32 x 256) and
//! both staging depths (8 and 32 reduction steps between barriers). Both kinds run: full f32, and TF32 tensor
//! cores, whose `mma.sync` the shim performs from every lane's fragments as the PTX ISA lays
//! them out (a fragment read from the wrong place gives a wrong sum). The TF32 kernels are
//! held to the CPU's convolution of the operands rounded to TF32 (so the kernels' own rounding
//! is checked too). Without a C++ compiler the test says it skipped. The GPU itself runs them in `tests/conformance.rs` under `REGIMEN_CONV=implicit`
//! (`bench/gpu-check`).
//!
//! Tolerance: both sides sum in f32 in different orders; `|diff| <= 1e-5 (1 + |y|) sqrt(K)`
//! with `K` the length of the sums (a misplaced term is an error of order 1).

use regimen::backend::Window;
use regimen::{DType, Device, Rng, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

mod emulate;
use emulate::{read, write};

const CONV: &str = include_str!("../src/backend/cuda/conv.cu");
const MAIN: &str = include_str!("emulate/conv_main.cpp");

/// `cvt.rna.tf32.f32`: 10 mantissa bits, to nearest, ties away from zero.
fn tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    f32::from_bits(v.to_bits().wrapping_add(0x1000) & 0xffff_e000)
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// The emulator binary, built into `dir`, or `None` when there is no C++ compiler.
fn build(dir: &Path) -> Option<PathBuf> {
    emulate::build(
        dir,
        "conv_emu",
        &[("conv.cu", CONV), ("conv_main.cpp", MAIN)],
        "implicit-GEMM",
    )
}

fn close(what: &str, got: &[f32], want: &[f32], k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = 1e-5 * (k as f64).sqrt();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let allowed = scale * (1.0 + (w as f64).abs());
        assert!(
            (g as f64 - w as f64).abs() <= allowed,
            "{what}[{i}]: emulated GPU kernel {g} vs CPU {w} (allowed {allowed:.2e})"
        );
    }
}

#[test]
fn implicit_gemm_kernels_match_the_cpu_convolution() {
    let dir = std::env::temp_dir().join(format!("regimen-conv-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some(exe) = build(&dir) else { return };
    // (nb, c, h, w, oc, kh, kw, stride, pad, chunk, bias): tiles crossed in every direction
    // (OC and C above 64, N P and N H W above 128, K above 128 and not a multiple of 8),
    // strides 1 and 2, padding 0 to 2, non-square windows and images, one to many chunks
    // of the weight gradient's reduction, the last one partial.
    let cases = [
        (2, 3, 9, 7, 70, 3, 3, 1, 1, 40, true),
        (3, 20, 8, 11, 5, 3, 2, 2, 0, 16, false),
        (2, 70, 6, 5, 9, 5, 5, 1, 2, 24, true),
        (2, 4, 17, 16, 8, 3, 3, 2, 1, 8, false),
        (3, 6, 7, 7, 66, 1, 1, 1, 0, 1000, true),
        (1, 1, 12, 10, 3, 4, 3, 3, 1, 8, true),
    ];
    let kinds = [false, true].into_iter().flat_map(|tc| {
        [(64, 8), (32, 8), (64, 32), (32, 32)]
            .into_iter()
            .map(move |(bm, bk)| (tc, bm, bk))
    });
    for (nb, c, h, w, oc, kh, kw, stride, pad, chunk, bias) in cases {
        for (tensor_cores, bm, bk) in kinds.clone() {
            let name = format!(
                "x [{nb}, {c}, {h}, {w}], w [{oc}, {c}, {kh}, {kw}], s{stride} p{pad}, {}, {bm}-row tiles, {bk} steps staged",
                if tensor_cores { "tf32" } else { "f32" }
            );
            let win = Window {
                kh,
                kw,
                stride,
                pad,
            };
            let xs = [nb, c, h, w];
            let ws = [oc, c, kh, kw];
            let (xv, wv, bv) = (
                randn(xs.iter().product(), 1),
                randn(ws.iter().product(), 2),
                randn(oc, 3),
            );
            let op = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&f| if tensor_cores { tf32(f) } else { f })
                    .collect()
            };
            let cpu = Device::Cpu;
            let be = cpu.backend();
            let x = Tensor::from_host(&xs, op(&xv), cpu).unwrap();
            let wt = Tensor::from_host(&ws, op(&wv), cpu).unwrap();
            let b = Tensor::from_host(&[oc], bv.clone(), cpu).unwrap();
            let y = be.conv2d_forward(&x, &wt, bias.then_some(&b), win);
            let dyv = randn(y.numel(), 4);
            let dy = Tensor::from_host(y.shape(), op(&dyv), cpu).unwrap();
            let dw0 = randn(wt.numel(), 5);
            let mut dw = Tensor::from_host(&ws, dw0.clone(), cpu).unwrap();
            let dx = be.conv2d_backward(&x, &wt, &dy, win, &mut dw, None, true);
            assert_eq!(dx.dtype(), DType::F32);

            write(&dir, "x.bin", &xv);
            write(&dir, "w.bin", &wv);
            write(&dir, "b.bin", &bv);
            write(&dir, "dy.bin", &dyv);
            write(&dir, "dw.bin", &dw0);
            let args = [
                nb,
                c,
                h,
                w,
                oc,
                kh,
                kw,
                stride,
                pad,
                chunk,
                bias as usize,
                tensor_cores as usize,
                bm,
                bk,
            ];
            let out = Command::new(&exe)
                .arg(&dir)
                .args(args.iter().map(|a| a.to_string()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: the emulator failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (p, k) = (y.shape()[2] * y.shape()[3], c * kh * kw);
            close(&format!("{name}: y"), &read(&dir, "y.out"), &y.to_vec(), k);
            close(
                &format!("{name}: dx"),
                &read(&dir, "dx.out"),
                &dx.to_vec(),
                oc * kh * kw,
            );
            close(
                &format!("{name}: dW"),
                &read(&dir, "dw.out"),
                &dw.to_vec(),
                nb * p,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
