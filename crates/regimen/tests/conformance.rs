//! Backend conformance: every `Backend` operation on random inputs, on every device present,
//! compared with the CPU backend; then whole training steps of the benchmark models, and a
//! step recorded as a CUDA graph and replayed.
//!
//! Tolerances: f32 operations within `1e-5 + 1e-4 |x|` of the CPU (different summation
//! orders); matrix products and convolutions in f32 (TF32 switched off here) within
//! `1e-4 + 1e-3 |x|` (long sums); bf16 products within `2e-2 + 2e-2 |x|` of the CPU's bf16
//! path (both round the same inputs; they differ in accumulation order only, but a bf16
//! rounding of an intermediate can flip); random draws (dropout masks, uniforms, the batch
//! gather, crop, translate, flip, Cutout) exactly; noise, scale, rotate, Mixup and CutMix
//! (draws and coordinates in f64 through `log`, `exp`, `sin`, `cos` and `pow`, which may differ
//! in the last bit between CUDA and the host) within the f32 bound.
//!
//! Without a GPU (or without the `cuda` feature) the CUDA part prints why it was skipped; the
//! CPU half of every comparison still runs, so the tests themselves are exercised.

use regimen::backend::{ParamUpdate, RandomKey, Target, Unary, UpdateRule, UpdateScalars, Window};
use regimen::layer::{Ctx, Layer};
use regimen::loss::CrossEntropy;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::{models, DType, Device, Indices, Precision, Rng, Tensor};

/// The GPU to test, or `None` (with the reason printed).
fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("CUDA conformance skipped: {e}");
            None
        }
    }
}

fn rand(shape: &[usize], seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| r.normal() as f32)
        .collect()
}

fn t(shape: &[usize], seed: u64, d: Device) -> Tensor {
    Tensor::from_host(shape, rand(shape, seed), d).unwrap()
}

#[derive(Clone, Copy)]
struct Tol(f64, f64);
const EXACT: Tol = Tol(0.0, 0.0);
const F32: Tol = Tol(1e-5, 1e-4);
const GEMM: Tol = Tol(1e-4, 1e-3);
const BF16: Tol = Tol(2e-2, 2e-2);

fn close(name: &str, a: &[f32], b: &[f32], tol: Tol) {
    assert_eq!(a.len(), b.len(), "{name}: lengths");
    let mut worst = (0usize, 0.0f64);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x.is_nan() || y.is_nan() {
            assert!(x.is_nan() && y.is_nan(), "{name}[{i}]: cpu {x} vs gpu {y}");
            continue;
        }
        if x == y {
            continue; // equal, infinities included
        }
        let err = (x as f64 - y as f64).abs();
        let allowed = tol.0 + tol.1 * (x as f64).abs();
        assert!(
            err <= allowed,
            "{name}[{i}]: cpu {x} vs gpu {y} (|diff| {err:.3e} > {allowed:.3e})"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
}

/// Run `f` on the CPU and on the GPU with the same inputs and compare every output. Without a
/// GPU the CPU half still runs, so that the test itself is exercised everywhere.
fn same(name: &str, tol: Tol, f: impl Fn(Device) -> Vec<Tensor>) {
    let a = f(Device::Cpu);
    let Some(g) = gpu() else { return };
    let b = f(g);
    assert_eq!(a.len(), b.len(), "{name}: outputs");
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.shape(), y.shape(), "{name} output {k}: shapes");
        assert_eq!(y.device(), g, "{name} output {k} stays on the GPU");
        close(&format!("{name} output {k}"), &x.to_vec(), &y.to_vec(), tol);
    }
}

fn step0(d: Device) -> Indices {
    Indices::from_host(vec![3], d)
}

#[test]
fn memory_and_casts() {
    same("upload/download/fill/copy", EXACT, |d| {
        let be = d.backend();
        let x = t(&[3, 5], 1, d);
        let mut y = be.zeros(&[3, 5], DType::F32);
        be.copy(&x, &mut y);
        let mut z = be.alloc(&[7], DType::F32);
        be.fill(&mut z, -2.5);
        let idx = Indices::from_host(vec![4, 0, 9], d);
        let as_f =
            Tensor::from_host(&[3], idx.to_vec().iter().map(|&v| v as f32).collect(), d).unwrap();
        vec![x, y, z, as_f]
    });
    same("casts round to nearest even", EXACT, |d| {
        let x = t(&[1000], 2, d);
        vec![
            x.to_dtype(DType::BF16).to_dtype(DType::F32),
            x.to_dtype(DType::F16).to_dtype(DType::F32),
            x.to_dtype(DType::BF16)
                .to_dtype(DType::F16)
                .to_dtype(DType::F32),
        ]
    });
}

#[test]
fn matrix_products_in_every_layout() {
    regimen_cuda_exact_convs();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for acc in [false, true] {
            same(&format!("matmul ta={ta} tb={tb} acc={acc}"), GEMM, |d| {
                let be = d.backend();
                let (m, k, n) = (37, 53, 29);
                let a = t(&if ta { [k, m] } else { [m, k] }, 3, d);
                let b = t(&if tb { [n, k] } else { [k, n] }, 4, d);
                let mut c = t(&[m, n], 5, d);
                be.matmul(&a, ta, &b, tb, &mut c, acc);
                vec![c]
            });
        }
    }
    for dt in [DType::BF16, DType::F16] {
        same(&format!("matmul {dt}"), BF16, |d| {
            let be = d.backend();
            let a = t(&[64, 96], 6, d).to_dtype(dt);
            let b = t(&[48, 96], 7, d).to_dtype(dt);
            let mut c = be.zeros(&[64, 48], DType::F32);
            be.matmul(&a, false, &b, true, &mut c, false);
            vec![c]
        });
    }
}

/// Convolutions compared in exact f32 (the GPU would use TF32 tensor cores by default).
fn regimen_cuda_exact_convs() {
    #[cfg(feature = "cuda")]
    regimen::backend::cuda::set_conv_tf32(false);
}

#[test]
fn elementwise_and_reductions() {
    same("elementwise", F32, |d| {
        let be = d.backend();
        let a = t(&[4, 3, 5], 8, d);
        let b = t(&[4, 3, 5], 9, d);
        let s = t(&[4], 10, d);
        let mut y = a.clone();
        be.axpy(0.7, &b, &mut y);
        let mut z = a.clone();
        be.scale(&mut z, -1.5);
        let mut c = a.clone();
        be.clamp(&mut c, -0.5, 0.25);
        let mut g = b.clone();
        be.add_sign(0.3, &a, &mut g);
        let mut biased = a.clone();
        let bias = t(&[3], 11, d);
        be.add_channel_bias(&mut biased, &bias, 3);
        let mut db = t(&[3], 12, d);
        be.channel_bias_backward(&a, &mut db, 3);
        vec![
            y,
            z,
            c,
            g,
            be.add(&a, &b),
            be.mul(&a, &b),
            be.scale_rows(&a, &s),
            biased,
            db,
            be.sum_abs(&a),
            be.sum_sq(&a),
            be.all_finite(&a),
        ]
    });
    // A layer with a bias followed by a ReLU (and a dropout) in one pass
    // (`Backend::bias_relu`, `bias_relu_dropout`), rows of a linear layer (the GPU's fused
    // kernels) and planes, with and without a bias.
    same("bias, ReLU and dropout", F32, |d| {
        let be = d.backend();
        let step = Indices::from_host(vec![4], d);
        let mut out = Vec::new();
        for (shape, c) in [(&[37usize, 70][..], 70usize), (&[4, 3, 5][..], 3)] {
            for (with_bias, p) in [(true, 0.0f32), (false, 0.0), (true, 0.3), (false, 0.3)] {
                let mut y = t(shape, 14, d);
                let bias = t(&[c], 15, d);
                let bias = with_bias.then_some(&bias);
                let keep = if p > 0.0 {
                    let key = RandomKey {
                        stream: 9,
                        step: &step,
                        purpose: 1,
                    };
                    be.bias_relu_dropout(&mut y, bias, c, p, key);
                    1.0 / (1.0 - p)
                } else {
                    be.bias_relu(&mut y, bias, c);
                    1.0
                };
                let dy = t(shape, 16, d);
                let mut db = t(&[c], 17, d);
                let db_in = with_bias.then_some(&mut db);
                let dz = be.bias_relu_backward(&y, &dy, db_in, c, keep);
                // From y kept in bf16 (bf16 activations).
                let yh = y.to_dtype(DType::BF16);
                let mut dbh = t(&[c], 17, d);
                let dzh = be.bias_relu_backward(&yh, &dy, with_bias.then_some(&mut dbh), c, keep);
                out.extend([y, dz, db, dzh, dbh]);
            }
        }
        out
    });
    same("reductions over many blocks", Tol(1e-3, 1e-6), |d| {
        let be = d.backend();
        let a = t(&[300_001], 13, d);
        vec![be.sum_abs(&a), be.sum_sq(&a)]
    });
    same("NaN and infinity", EXACT, |d| {
        let be = d.backend();
        let x = Tensor::from_host(&[4], vec![1.0, f32::NAN, -2.0, f32::INFINITY], d).unwrap();
        let mut c = x.clone();
        be.clamp(&mut c, -1.0, 1.0);
        vec![be.all_finite(&x), c, be.unary_forward(Unary::Relu, &x)]
    });
}

#[test]
fn activations_forward_and_backward() {
    let ops = [
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Relu,
        Unary::LeakyRelu(0.1),
        Unary::Elu(0.7),
        Unary::Selu,
        Unary::Softplus {
            beta: 2.0,
            threshold: 5.0,
        },
        Unary::Gelu,
        Unary::Mish,
        Unary::Swish(1.5),
    ];
    for op in ops {
        same(&format!("{op:?}"), Tol(2e-6, 2e-5), |d| {
            let be = d.backend();
            let x = t(&[6, 7], 14, d);
            let dy = t(&[6, 7], 15, d);
            let y = be.unary_forward(op, &x);
            let dx = be.unary_backward(op, &x, &y, &dy);
            vec![y, dx]
        });
    }
    same("prelu, swish, softmax", F32, |d| {
        let be = d.backend();
        let x = t(&[3, 4, 5], 16, d);
        let dy = t(&[3, 4, 5], 17, d);
        let a4 = t(&[4], 18, d);
        let a1 = t(&[1], 19, d);
        let (mut da4, mut da1) = (be.zeros(&[4], DType::F32), be.zeros(&[1], DType::F32));
        let beta = Tensor::from_host(&[1], vec![1.3], d).unwrap();
        let mut dbeta = be.zeros(&[1], DType::F32);
        let y = be.softmax_forward(&x, 4);
        vec![
            be.prelu_forward(&x, &a4, 4),
            be.prelu_backward(&x, &a4, &dy, &mut da4, 4),
            da4,
            be.prelu_forward(&x, &a1, 4),
            be.prelu_backward(&x, &a1, &dy, &mut da1, 4),
            da1,
            be.swish_forward(&x, &beta),
            be.swish_backward(&x, &beta, &dy, &mut dbeta),
            dbeta,
            be.softmax_backward(&y, &dy, 4),
            y,
        ]
    });
}

#[test]
fn convolutions() {
    regimen_cuda_exact_convs();
    // (kh, kw, stride, pad, bias, c, oc): the last shape crosses the implicit-GEMM kernels'
    // tiles (64 channels, 128 positions) in every direction.
    let cases = [
        (3, 3, 1, 1, true, 4, 6),
        (3, 3, 2, 1, false, 4, 6),
        (1, 1, 1, 0, true, 4, 6),
        (5, 3, 2, 0, true, 4, 6),
        (3, 3, 1, 1, true, 70, 66),
    ];
    for (kh, kw, stride, pad, bias, c, oc) in cases {
        same(
            &format!("conv {c}->{oc} k{kh}x{kw} s{stride} p{pad} bias={bias}"),
            GEMM,
            |d| {
                let be = d.backend();
                let win = Window {
                    kh,
                    kw,
                    stride,
                    pad,
                };
                let x = t(&[3, c, 9, 8], 20, d);
                let w = t(&[oc, c, kh, kw], 21, d);
                let b = t(&[oc], 22, d);
                let y = be.conv2d_forward(&x, &w, bias.then_some(&b), win);
                let dy = t(y.shape(), 23, d);
                let mut dw = t(&[oc, c, kh, kw], 24, d);
                let mut db = t(&[oc], 25, d);
                let dx =
                    be.conv2d_backward(&x, &w, &dy, win, &mut dw, bias.then_some(&mut db), true);
                let mut dw2 = be.zeros(&[oc, c, kh, kw], DType::F32);
                let none = be.conv2d_backward(&x, &w, &dy, win, &mut dw2, None, false);
                assert_eq!(none.numel(), 0);
                vec![y, dx, dw, db, dw2]
            },
        );
    }
    // A weight gradient over 13 x 29 x 29 = 10,933 positions: im2col splits its product in two
    // of 5,466 terms and adds the one left over onto the first (`gemm_splits`), in f32 and
    // with 16-bit operands.
    for dt in [DType::F32, DType::BF16] {
        same(
            &format!("conv weight gradient over 10,933 positions, {dt}"),
            if dt == DType::F32 { GEMM } else { BF16 },
            |d| {
                let be = d.backend();
                let win = Window {
                    kh: 3,
                    kw: 3,
                    stride: 1,
                    pad: 1,
                };
                let x = t(&[13, 3, 29, 29], 29, d).to_dtype(dt);
                let w = t(&[4, 3, 3, 3], 30, d).to_dtype(dt);
                let dy = t(&[13, 4, 29, 29], 31, d);
                let mut dw = t(&[4, 3, 3, 3], 32, d);
                be.conv2d_backward(&x, &w, &dy, win, &mut dw, None, false);
                vec![dw]
            },
        );
    }
    same("conv bf16", BF16, |d| {
        let be = d.backend();
        let win = Window {
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        let x = t(&[2, 8, 6, 6], 26, d).to_dtype(DType::BF16);
        let w = t(&[5, 8, 3, 3], 27, d).to_dtype(DType::BF16);
        let y = be.conv2d_forward(&x, &w, None, win);
        let dy = t(y.shape(), 28, d);
        let mut dw = be.zeros(&[5, 8, 3, 3], DType::F32);
        let dx = be.conv2d_backward(&x, &w, &dy, win, &mut dw, None, true);
        vec![y, dx, dw]
    });
    // Under REGIMEN_CUDNN=1 or REGIMEN_CONV=implicit (bench/gpu-check's later runs) every
    // f32 convolution above must have run on that engine, or the run would test im2col again.
    if let (Some(g), Ok("1")) = (gpu(), std::env::var("REGIMEN_CUDNN").as_deref()) {
        assert_eq!(
            regimen::backend::gpu_conv_engine(g).as_deref(),
            Some("cudnn")
        );
    } else if let (Some(g), Ok("implicit")) = (gpu(), std::env::var("REGIMEN_CONV").as_deref()) {
        assert_eq!(
            regimen::backend::gpu_conv_engine(g).as_deref(),
            Some("implicit")
        );
    }
}

/// The TF32 tensor-core convolutions (im2col + cuBLAS by default, cuDNN or the implicit-GEMM
/// kernels as `REGIMEN_CUDNN` / `REGIMEN_CONV` choose) against the CPU's f32: TF32 keeps 10
/// mantissa bits of each operand, so a product is off by up to about 1e-3 of itself, and a sum
/// of K = 630 of them by a few hundredths; a misplaced term is off by the size of the result
/// (about 25 here). Ignored in ordinary runs because it switches TF32 on for the whole process
/// (the other tests compare f32 exactly); `bench/gpu-check` runs it alone.
#[test]
#[ignore = "switches TF32 on for the whole process: run alone (bench/gpu-check does)"]
fn convolutions_tf32() {
    #[cfg(feature = "cuda")]
    regimen::backend::cuda::set_conv_tf32(true);
    // 70 -> 66 channels: 64-row tiles of the implicit kernels; 16 -> 24: their 32-row tiles.
    for (c, oc) in [(70, 66), (16, 24)] {
        same(&format!("conv {c}->{oc} tf32"), Tol(0.1, 1e-2), |d| {
            let be = d.backend();
            let win = Window {
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            };
            let x = t(&[3, c, 9, 8], 30, d);
            let w = t(&[oc, c, 3, 3], 31, d);
            let b = t(&[oc], 32, d);
            let y = be.conv2d_forward(&x, &w, Some(&b), win);
            let dy = t(y.shape(), 33, d);
            let mut dw = t(&[oc, c, 3, 3], 34, d);
            let dx = be.conv2d_backward(&x, &w, &dy, win, &mut dw, None, true);
            vec![y, dx, dw]
        });
    }
    regimen_cuda_exact_convs();
}

#[test]
fn pooling() {
    for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1)] {
        same(&format!("pool k{k} s{s} p{p}"), F32, |d| {
            let be = d.backend();
            let win = Window {
                kh: k,
                kw: k,
                stride: s,
                pad: p,
            };
            let x = t(&[2, 3, 8, 7], 30, d);
            let (y, idx) = be.max_pool2d_forward(&x, win);
            let dy = t(y.shape(), 31, d);
            let dx = be.max_backward(&dy, &idx, x.shape(), y.shape()[2] * y.shape()[3], 56);
            let ya = be.avg_pool2d_forward(&x, win);
            let dxa = be.avg_pool2d_backward(&dy, x.shape(), win);
            let idxf = Tensor::from_host(
                &[idx.len()],
                idx.to_vec().iter().map(|&v| v as f32).collect(),
                d,
            )
            .unwrap();
            vec![y, dx, ya, dxa, idxf]
        });
    }
    same("max pool 2x2 propagates NaN", EXACT, |d| {
        let be = d.backend();
        let x = Tensor::from_host(&[1, 1, 2, 2], vec![f32::NAN, 1.0, 2.0, 3.0], d).unwrap();
        let win = Window {
            kh: 2,
            kw: 2,
            stride: 2,
            pad: 0,
        };
        vec![be.max_pool2d_forward(&x, win).0]
    });
    same("global, fractional, maxout", F32, |d| {
        let be = d.backend();
        let x = t(&[2, 3, 9, 10], 32, d);
        let g = be.global_avg_pool_forward(&x, 3);
        let dg = be.global_avg_pool_backward(&t(&[2, 3], 33, d), x.shape());
        let samples = Tensor::from_host(
            &[6, 2],
            (0..12).map(|i| (i as f32 * 0.37) % 1.0).collect(),
            d,
        )
        .unwrap();
        let (f, fi) = be.fractional_max_pool2d_forward(&x, (2, 2), (5, 6), &samples);
        let m = t(&[4, 12], 34, d);
        let (mo, mi) = be.max_groups_forward(&m, 3);
        let idx = |i: &Indices| {
            Tensor::from_host(
                &[i.len()],
                i.to_vec().iter().map(|&v| v as f32).collect(),
                d,
            )
            .unwrap()
        };
        vec![g, dg, f, idx(&fi), mo, idx(&mi)]
    });
}

#[test]
fn batch_norm_and_randomness() {
    same("batch norm", Tol(2e-5, 2e-4), |d| {
        let be = d.backend();
        let x = t(&[5, 3, 4, 4], 40, d);
        let gamma = t(&[3], 41, d);
        let beta = t(&[3], 42, d);
        let mut rm = t(&[3], 43, d);
        let mut rv = Tensor::full(&[3], 1.5, d);
        let (y, mean, invstd) =
            be.batch_norm_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5);
        let dy = t(x.shape(), 44, d);
        let (mut dg, mut db) = (be.zeros(&[3], DType::F32), be.zeros(&[3], DType::F32));
        let dx = be.batch_norm_backward(&x, &dy, &gamma, &mean, &invstd, true, &mut dg, &mut db);
        let ye = be.batch_norm_forward_eval(&x, &gamma, &beta, &rm, &rv, 1e-5);
        let ie = be.invstd(&rv, 1e-5);
        let (mut dg2, mut db2) = (be.zeros(&[3], DType::F32), be.zeros(&[3], DType::F32));
        let dxe = be.batch_norm_backward(&x, &dy, &gamma, &rm, &ie, false, &mut dg2, &mut db2);
        vec![y, mean, invstd, rm, rv, dx, dg, db, ye, dxe, dg2, db2]
    });
    // Batch norm over features ([N, C]: the row kernels on a GPU), train and eval, alone and
    // followed by a ReLU; 37 channels (two blocks of 32) and 19 rows (uneven splits).
    same("batch norm over features", Tol(2e-5, 2e-4), |d| {
        let be = d.backend();
        let x = t(&[19, 37], 51, d);
        let gamma = t(&[37], 52, d);
        let beta = t(&[37], 53, d);
        let mut rm = t(&[37], 54, d);
        let mut rv = Tensor::full(&[37], 1.5, d);
        let dy = t(x.shape(), 55, d);
        let zeros = || (be.zeros(&[37], DType::F32), be.zeros(&[37], DType::F32));
        let (y, mean, invstd) =
            be.batch_norm_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5);
        let (mut dg, mut db) = zeros();
        let dx = be.batch_norm_backward(&x, &dy, &gamma, &mean, &invstd, true, &mut dg, &mut db);
        let (yr, mr, ir) =
            be.batch_norm_relu_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5);
        let (mut dgr, mut dbr) = zeros();
        let dxr =
            be.batch_norm_relu_backward(&x, &yr, &dy, &gamma, &beta, &mr, &ir, &mut dgr, &mut dbr);
        let ye = be.batch_norm_forward_eval(&x, &gamma, &beta, &rm, &rv, 1e-5);
        let ie = be.invstd(&rv, 1e-5);
        let (mut dge, mut dbe) = zeros();
        let dxe = be.batch_norm_backward(&x, &dy, &gamma, &rm, &ie, false, &mut dge, &mut dbe);
        vec![
            y, mean, invstd, dx, dg, db, yr, dxr, dgr, dbr, rm, rv, ye, dxe, dge, dbe,
        ]
    });
    // Batch norm followed by a ReLU, and by a ReLU and a 2x2 max pool (odd sizes: a row and a
    // column outside every window), in batch norm's own passes.
    same("batch norm + ReLU (+ 2x2 max pool)", Tol(2e-5, 2e-4), |d| {
        let be = d.backend();
        let mut out = Vec::new();
        for pool in [false, true] {
            let x = t(&[5, 3, 7, 9], 46, d);
            let gamma = t(&[3], 47, d);
            let beta = t(&[3], 48, d);
            let mut rm = t(&[3], 49, d);
            let mut rv = Tensor::full(&[3], 1.5, d);
            let (y, mean, invstd) = if pool {
                be.batch_norm_relu_pool_forward_train(
                    &x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5,
                )
                .expect("both backends fuse the pool")
            } else {
                be.batch_norm_relu_forward_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5)
            };
            let dy = t(y.shape(), 50, d);
            let (mut dg, mut db) = (be.zeros(&[3], DType::F32), be.zeros(&[3], DType::F32));
            let dx = if pool {
                be.batch_norm_relu_pool_backward(
                    &x, &dy, &gamma, &beta, &mean, &invstd, &mut dg, &mut db,
                )
            } else {
                be.batch_norm_relu_backward(
                    &x, &y, &dy, &gamma, &beta, &mean, &invstd, &mut dg, &mut db,
                )
            };
            out.extend([y, mean, invstd, rm, rv, dx, dg, db]);
        }
        out
    });
    same("Philox draws are the same on every device", EXACT, |d| {
        let be = d.backend();
        let step = step0(d);
        let key = |purpose| RandomKey {
            stream: 0x1234_5678_9abc,
            step: &step,
            purpose,
        };
        let x = t(&[1001], 45, d);
        let (y, mask) = be.dropout_forward(&x, 0.3, key(1));
        vec![
            y,
            mask,
            be.uniform(&[77], key(3)),
            be.bernoulli_keep(&[50], 0.4, key(2)),
        ]
    });
}

#[test]
fn batches_gathered_and_augmented_on_the_device() {
    use regimen::rng::purpose::{AUGMENT, AUGMENT_STEP};
    let (n, b, c, h, w) = (23, 9, 2, 10, 12);
    let batch = |d: Device, step: u32| -> (Tensor, Indices) {
        let be = d.backend();
        let images = t(&[n, c, h, w], 60, d);
        let labels = Indices::from_host((0..n as u32).map(|i| (i * 7) % 10).collect(), d);
        let order = Indices::from_host((0..n as u32).map(|i| (i * 5 + 3) % n as u32).collect(), d);
        let cursor = Indices::from_host(vec![4], d);
        let s = Indices::from_host(vec![step], d);
        let key = RandomKey {
            stream: 0xA06,
            step: &s,
            purpose: AUGMENT,
        };
        let mut x = be.alloc(&[b, c, h, w], DType::F32);
        let mut y = Indices::zeros(b, d);
        be.gather_augment(
            &images, &labels, &order, &cursor, &mut x, &mut y, 3, 0.5, key,
        );
        (x, y)
    };
    same("gather with crop and flip", EXACT, |d| {
        let (x, y) = batch(d, 7);
        let y = Tensor::from_host(&[b], y.to_vec().iter().map(|&v| v as f32).collect(), d).unwrap();
        vec![x, y]
    });
    same("one-hot labels", EXACT, |d| {
        let be = d.backend();
        let (_, y) = batch(d, 8);
        let mut soft = be.zeros(&[b, 10], DType::F32);
        be.one_hot(&y, &mut soft);
        vec![soft]
    });
    // The per-image steps: integer draws and copies exactly; the noise's Box-Muller and the
    // bilinear resampling of scale and rotate (log, exp, sin, cos of CUDA against the host's)
    // within the f32 bound.
    use regimen::data::Augment;
    for (a, tol) in [
        (Augment::Crop { pad: 3 }, EXACT),
        (Augment::Translate { pixels: 2 }, EXACT),
        (Augment::Flip { p: 0.5 }, EXACT),
        (Augment::Cutout { size: 5 }, EXACT),
        (Augment::Noise { std: 0.3 }, F32),
        (Augment::Scale { min_area: 0.4 }, F32),
        (Augment::Rotate { degrees: 25.0 }, F32),
    ] {
        same(&format!("{a:?} of each sample"), tol, |d| {
            let be = d.backend();
            let mut out = Vec::new();
            for step in [8, 9] {
                let (mut x, _) = batch(d, step);
                let s = Indices::from_host(vec![step], d);
                let key = RandomKey {
                    stream: 0xA06,
                    step: &s,
                    purpose: AUGMENT_STEP + 2,
                };
                be.augment_samples(&mut x, a, key);
                out.push(x);
            }
            out
        });
    }
    // Beta draws and boxes in f64 (CUDA's log, cos and pow may differ from the host's in the
    // last bit): F32 tolerance.
    for (alpha, cutmix) in [(0.3, false), (2.5, false), (1.0, true), (0.5, true)] {
        same(&format!("mix alpha {alpha} cutmix {cutmix}"), F32, |d| {
            let be = d.backend();
            let mut out = Vec::new();
            for step in 0..6 {
                let (mut x, y) = batch(d, step);
                let mut soft = be.zeros(&[b, 10], DType::F32);
                be.one_hot(&y, &mut soft);
                let s = Indices::from_host(vec![step], d);
                let key = RandomKey {
                    stream: 0xA06,
                    step: &s,
                    purpose: AUGMENT_STEP + 1,
                };
                be.mix_batch(&mut x, &mut soft, alpha, cutmix, key);
                out.extend([x, soft]);
            }
            out
        });
    }
}

/// Whole epochs with batches built and augmented on the device (crop, flip, rotate, noise,
/// Cutout, Mixup, CutMix), one epoch: the GPU's eager run against the CPU's (the same draws; summation orders
/// differ),
/// and the GPU's recorded-and-replayed run against its eager one.
#[test]
fn device_batches_train_alike_on_every_device() {
    use regimen::data::{Dataset, Pipeline};
    use regimen::schedule::Constant;
    use regimen::train::{fit, FitConfig};
    use std::sync::Arc;
    regimen_cuda_exact_convs();
    let data = |n: usize, seed: u64| Dataset {
        images: rand(&[n, 1, 8, 8], seed),
        labels: (0..n as u32).map(|i| (i * 3) % 10).collect(),
        image_shape: [1, 8, 8],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    let (train, test) = (Arc::new(data(150, 70)), data(40, 71));
    let run = |d: Device, graph: bool| -> Vec<Tensor> {
        let mut model = models::for_input("digits-cnn", [1, 8, 8], 10, &mut Rng::new(3)).unwrap();
        regimen::layer::to_device(&mut model, d);
        let mut optim = Optim::new(Sgd::momentum(0.9), OptimConfig::default()).unwrap();
        let cfg = FitConfig {
            epochs: 1,
            batch_size: 32, // four full batches (two eager, one recorded, one replay), then 22
            seed: 5,
            device: d,
            device_data: true,
            graph,
            augment: Pipeline::parse(
                "crop=1,flip,rotate=10,noise=0.05,cutout=3,mixup=0.4,cutmix=1.0",
            )
            .unwrap(),
            ..Default::default()
        };
        fit(
            &mut model,
            train.clone(),
            &test,
            &cfg,
            &mut optim,
            &mut Constant(0.02),
            |_| {},
        )
        .unwrap();
        let mut w = Vec::new();
        regimen::layer::Layer::visit_params(&mut model, "", &mut |_, p| w.push(p.value.clone()));
        w
    };
    let cpu = run(Device::Cpu, false);
    let Some(g) = gpu() else { return };
    let (eager, replayed) = (run(g, false), run(g, true));
    for (k, ((a, b), c)) in cpu.iter().zip(&eager).zip(&replayed).enumerate() {
        close(
            &format!("tensor {k}, CPU vs GPU"),
            &a.to_vec(),
            &b.to_vec(),
            Tol(5e-4, 5e-3),
        );
        close(
            &format!("tensor {k}, GPU graph vs eager"),
            &b.to_vec(),
            &c.to_vec(),
            Tol(1e-5, 1e-4),
        );
    }
}

#[test]
fn losses_and_metrics() {
    same("cross-entropy", F32, |d| {
        let be = d.backend();
        let logits = t(&[9, 10], 50, d);
        let labels = Indices::from_host((0..9).map(|i| (i * 7 % 10) as u32).collect(), d);
        let soft = be.softmax_forward(&t(&[9, 10], 51, d), 10);
        let (l1, g1) = be.softmax_cross_entropy(&logits, Target::Hard(&labels), 0.0, 1.0);
        let (l2, g2) = be.softmax_cross_entropy(&logits, Target::Hard(&labels), 0.1, 0.5);
        let (l3, g3) = be.softmax_cross_entropy(&logits, Target::Soft(&soft), 0.2, 1.0);
        let (l4, g4) = be.mse(&logits, &soft, 2.0);
        vec![
            l1,
            g1,
            l2,
            g2,
            l3,
            g3,
            l4,
            g4,
            be.count_correct(&logits, &labels),
        ]
    });
}

#[test]
fn optimizer_updates_and_clipping() {
    let rules = [
        UpdateRule::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        },
        UpdateRule::Sgd {
            momentum: 0.9,
            dampening: 0.1,
            nesterov: false,
        },
        UpdateRule::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
        },
        UpdateRule::Adagrad {
            lr_decay: 0.01,
            eps: 1e-10,
            initial: 0.1,
        },
        UpdateRule::RmsProp {
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.5,
            centered: true,
        },
        UpdateRule::RmsProp {
            alpha: 0.9,
            eps: 1e-8,
            momentum: 0.0,
            centered: false,
        },
        UpdateRule::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            amsgrad: true,
            decoupled: true,
        },
    ];
    for rule in rules {
        same(&format!("{rule:?}"), Tol(1e-6, 1e-5), |d| {
            let be = d.backend();
            let mut out = Vec::new();
            let mut values = [t(&[5000], 60, d), t(&[7, 3], 61, d)];
            let mut states: Vec<Vec<Tensor>> = values
                .iter()
                .map(|v| {
                    (0..rule.slots())
                        .map(|_| Tensor::full(v.shape(), rule.initial_state(), d))
                        .collect()
                })
                .collect();
            let lr = Tensor::from_host(&[3], vec![0.1, 0.05, 0.02], d).unwrap();
            let mut step = Indices::zeros(1, d);
            for s in 0..3 {
                let mut grads = [t(&[5000], 70 + s, d), t(&[7, 3], 80 + s, d)];
                let (norm, coef) = be.clip_coefficient(&[&grads[0], &grads[1]], 5.0);
                be.increment(&mut step, 1);
                let [v0, v1] = &mut values;
                let [g0, g1] = &mut grads;
                let (s0, s1) = states.split_at_mut(1);
                let mut params = [
                    ParamUpdate {
                        value: v0,
                        grad: g0,
                        state: &mut s0[0],
                        lr_scale: 1.0,
                        weight_decay: 0.01,
                    },
                    ParamUpdate {
                        value: v1,
                        grad: g1,
                        state: &mut s1[0],
                        lr_scale: 0.5,
                        weight_decay: 0.0,
                    },
                ];
                be.optim_update(
                    &rule,
                    &UpdateScalars {
                        lr: &lr,
                        step: &step,
                        grad_scale: Some(&coef),
                    },
                    &mut params,
                );
                out.extend([norm, coef]);
                out.extend(grads);
            }
            out.extend(values);
            out.extend(states.into_iter().flatten());
            out
        });
    }
}

/// A benchmark model on `d` with its batch, optimizer (Nesterov, weight decay, clipping) and
/// loss: everything a training step of the tests below needs.
struct Setup {
    model: regimen::layers::Sequential,
    x: Tensor,
    y: Indices,
    opt: Optim,
    ce: CrossEntropy,
}

impl Setup {
    fn new(name: &str, d: Device) -> Setup {
        let mut rng = Rng::new(0);
        let mut model = match name {
            "mlp" => models::bench_mlp(&mut rng).unwrap(),
            _ => models::bench_cnn(&mut rng).unwrap(),
        };
        regimen::layer::to_device(&mut model, d);
        model.set_input_grad(false);
        let opt = Optim::new(
            Sgd::nesterov(0.9),
            OptimConfig {
                weight_decay: 5e-4,
                clip_norm: Some(5.0),
                ..Default::default()
            },
        )
        .unwrap();
        Setup {
            model,
            x: t(&[32, 1, 28, 28], 90, d),
            y: Indices::from_host((0..32).map(|i| (i % 10) as u32).collect(), d),
            opt,
            ce: CrossEntropy::with_label_smoothing(0.1).unwrap(),
        }
    }

    fn step(&mut self, precision: Precision) {
        let d = self.x.device();
        let logits = {
            let ctx = Ctx::train()
                .at_step(self.opt.step_counter(d))
                .with_precision(precision);
            self.model.forward(&self.x, &ctx).unwrap()
        };
        let out = self.ce.forward(&logits, Target::Hard(&self.y)).unwrap();
        self.model.backward(&out.grad).unwrap();
        self.opt.step(&mut self.model, 0.05).unwrap();
    }

    /// Parameters, then buffers.
    fn state(&mut self) -> Vec<Tensor> {
        let mut out = Vec::new();
        self.model
            .visit_params("", &mut |_, p| out.push(p.value.clone()));
        self.model
            .visit_buffers("", &mut |_, b| out.push(b.clone()));
        out
    }
}

/// Three training steps of a benchmark model (dropout, batch norm, momentum, clipping) on
/// both devices from the same weights and batch: the weights stay together. (Batch norm over
/// 32 samples amplifies the summation-order differences of the convolutions: after three
/// steps the CNN's weights agree within 5e-4 + 5e-3 |w|, where one wrong gradient would move
/// them by the step size, about 5e-2.)
fn train_steps(name: &str, d: Device, precision: Precision, steps: usize) -> Vec<Tensor> {
    let mut s = Setup::new(name, d);
    for _ in 0..steps {
        s.step(precision);
    }
    s.state()
}

#[test]
fn whole_training_steps_match() {
    regimen_cuda_exact_convs();
    same("mlp 3 steps", Tol(1e-4, 1e-3), |d| {
        train_steps("mlp", d, Precision::F32, 3)
    });
    same("cnn 3 steps", Tol(5e-4, 5e-3), |d| {
        train_steps("cnn", d, Precision::F32, 3)
    });
    same("mlp 3 steps bf16", BF16, |d| {
        train_steps("mlp", d, Precision::Bf16, 3)
    });
    // (bf16 activations through convolutions and batch norm's bf16 kernels.)
    same("cnn 3 steps bf16", BF16, |d| {
        train_steps("cnn", d, Precision::Bf16, 3)
    });
}

#[test]
fn a_recorded_step_replays_as_the_eager_steps() {
    let Some(g) = gpu() else { return };
    regimen_cuda_exact_convs();
    let cases = [
        ("mlp", Precision::F32),
        ("cnn", Precision::F32),
        ("cnn", Precision::Bf16),
    ];
    for (name, precision) in cases {
        let eager = train_steps(name, g, precision, 4);
        // The same four steps: two eager (the pool and the optimizer state reach their steady
        // state), one recorded, then two replays (the recording itself runs nothing).
        let mut s = Setup::new(name, g);
        s.opt.set_lr_table(vec![0.05]).unwrap();
        s.step(precision);
        s.step(precision);
        let be = g.backend();
        be.begin_capture().unwrap();
        regimen::backend::strict::set_strict(true);
        s.step(precision);
        regimen::backend::strict::set_strict(false);
        let graph = be.end_capture().unwrap();
        for _ in 0..2 {
            graph.replay().unwrap();
        }
        let replayed = s.state();
        for (k, (a, b)) in eager.iter().zip(&replayed).enumerate() {
            close(
                &format!("{name} {precision:?} graph tensor {k}"),
                &a.to_vec(),
                &b.to_vec(),
                Tol(1e-5, 1e-4),
            );
        }
        drop(graph);
    }
}

/// The kernel trace (`regimen bench --kernels`): one timed entry per operation, in order,
/// named by what ran; on the CPU the work runs untraced.
#[test]
fn a_kernel_trace_names_and_times_each_operation() {
    let (sum, none) = regimen::backend::gpu_kernel_trace(Device::Cpu, 1.0, || 2 + 2).unwrap();
    assert_eq!(
        (sum, none.is_none()),
        (4, true),
        "the CPU runs the work untraced"
    );
    let Some(g) = gpu() else { return };
    let be = g.backend();
    let a = t(&[256, 384], 1, g);
    let b = t(&[384, 128], 2, g);
    let mut c = be.zeros(&[256, 128], DType::F32);
    let (sum, trace) = regimen::backend::gpu_kernel_trace(g, 50.0, || {
        be.matmul(&a, false, &b, false, &mut c, false);
        be.add(&c, &c)
    })
    .unwrap();
    let trace = trace.expect("a trace on the GPU");
    let labels: Vec<&str> = trace.ops.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(labels.len(), 2, "one entry per operation: {labels:?}");
    assert!(
        labels[0].starts_with("cuBLAS NN m256 n128 k384"),
        "{labels:?}"
    );
    assert!(labels[1].starts_with("add ["), "{labels:?}");
    for (label, us) in &trace.ops {
        // Both are far under a millisecond on any supported GPU; a time that includes the
        // 50 ms hold (the start event placed before the spinning kernel) fails here.
        assert!(*us > 0.0 && *us < 5_000.0, "{label}: {us} us");
    }
    assert_eq!(trace.caveat(), None);
    close(
        "traced add",
        &sum.to_vec(),
        &be.add(&c, &c).to_vec(),
        Tol(0.0, 0.0),
    );
}

#[test]
fn kernels_compile_with_nvrtc() {
    #[cfg(feature = "cuda")]
    match regimen::backend::cuda::compile_kernels((9, 0)) {
        Ok(ptx) => {
            for name in regimen::backend::cuda::KERNEL_NAMES {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "the PTX has no kernel {name}, which the backend launches"
                );
            }
        }
        Err(e) if e.to_string().contains("not found") => {
            eprintln!("NVRTC compile check skipped: {e}")
        }
        Err(e) => panic!("{e}"),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("NVRTC compile check skipped: built without the cuda feature");
}

/// The same kernels assembled to machine code for an A100 (sm_80) and an H100/H200 (sm_90),
/// as the driver does when it loads them: the assembler's limits (48 KiB of shared memory a
/// kernel may declare, registers) are checked only there, so a kernel past them would pass
/// the PTX check above and fail to load on the GPU.
#[test]
fn kernels_assemble_for_ampere_and_hopper() {
    #[cfg(feature = "cuda")]
    for arch in [(8, 0), (9, 0)] {
        match regimen::backend::cuda::assemble_kernels(arch) {
            Ok(bytes) => assert!(bytes > 100_000, "sm_{}{}: {bytes} bytes", arch.0, arch.1),
            Err(e) if e.to_string().contains("not found") => {
                eprintln!("NVRTC assembly check skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("NVRTC assembly check skipped: built without the cuda feature");
}

/// NCCL on one GPU, a world of one rank (`REGIMEN_NCCL`'s path; several GPUs are needed for
/// more): a model's gradients, scaled by the rank's share and summed, are the gradients times
/// the share, bit for bit; a CPU tensor is refused. Needs NCCL on the library path (the GPU
/// check puts PyTorch's there); without it, or without a GPU, the test says it skipped.
#[cfg(feature = "cuda")]
#[test]
fn nccl_sums_of_one_rank_on_the_gpu() {
    use regimen::backend::cuda::nccl;
    use regimen::dist::device_sum::DeviceSum;
    let Some(g) = gpu() else { return };
    if let Err(e) = nccl::version() {
        eprintln!("NCCL conformance skipped: {e}");
        return;
    }
    let mut model = models::for_input("digits-mlp", [1, 8, 8], 10, &mut Rng::new(4)).unwrap();
    regimen::layer::to_device(&mut model, g);
    let x = t(&[16, 1, 8, 8], 40, g);
    let y = Indices::from_host((0..16u32).map(|i| i % 10).collect(), g);
    let logits = model.forward(&x, &Ctx::train()).unwrap();
    let out = CrossEntropy::new()
        .forward(&logits, Target::Hard(&y))
        .unwrap();
    model.backward(&out.grad).unwrap();
    let grads = |m: &mut dyn Layer| {
        let mut v = Vec::new();
        m.visit_params("", &mut |_, p| v.push(p.grad.to_vec()));
        v
    };
    let before = grads(&mut model);
    assert!(before.iter().flatten().any(|&x| x != 0.0));
    let sum = DeviceSum::start(&regimen::dist::Single, g).unwrap();
    eprintln!("{}", sum.describe());
    sum.sum_grads(&mut model, 0.25).unwrap();
    let after = grads(&mut model);
    for (k, (a, b)) in before.iter().zip(&after).enumerate() {
        let want: Vec<f32> = a.iter().map(|x| x * 0.25).collect();
        assert_eq!(b, &want, "gradient {k}");
    }
    // The communicator directly: a tensor on the CPU is an error, not a crash.
    let id = nccl::unique_id().unwrap();
    let comm = nccl::NcclComm::new(0, &id, 0, 1).unwrap();
    let mut on_cpu = t(&[3], 41, Device::Cpu);
    let e = comm
        .sum_in_place(&mut [&mut on_cpu])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:0"), "{e}");
    let mut on_gpu = t(&[1000], 42, g);
    let want = on_gpu.to_vec();
    comm.sum_in_place(&mut [&mut on_gpu]).unwrap();
    assert_eq!(on_gpu.to_vec(), want);
}
