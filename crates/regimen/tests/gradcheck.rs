//! Finite-difference checks of every layer's backward (input and every parameter, in each
//! mode where the layer differs) and of every loss; and a check that the checker catches a
//! wrong backward.

mod common;

use common::{randn, spaced};
use regimen::backend::Unary;
use regimen::layer::{Ctx, Layer, Mode};
use regimen::layers::*;
use regimen::loss::{CrossEntropy, Mse, Penalty};
use regimen::{GradCheck, Indices, Rng, Target, Tensor};

fn check(layer: &mut dyn Layer, x: &Tensor, mode: Mode) {
    check_with(&GradCheck::default(), layer, x, mode);
}

fn check_with(cfg: &GradCheck, layer: &mut dyn Layer, x: &Tensor, mode: Mode) {
    let report = cfg.layer(layer, x, mode).unwrap();
    eprintln!("{} ({mode:?}):\n{report}", layer.describe());
    assert!(
        report.passed(),
        "{} ({mode:?}) failed the gradient check:\n{report}",
        layer.describe()
    );
}

fn both_modes(layer: &mut dyn Layer, x: &Tensor) {
    check(layer, x, Mode::Train);
    check(layer, x, Mode::Eval);
}

#[test]
fn linear() {
    let rng = &mut Rng::new(1);
    check(&mut Linear::new(6, 4, rng), &randn(&[3, 6], 2), Mode::Train);
    check(
        &mut Linear::new(6, 4, rng).without_bias(),
        &randn(&[3, 6], 3),
        Mode::Train,
    );
}

#[test]
fn conv2d() {
    let rng = &mut Rng::new(2);
    check(
        &mut Conv2d::new(2, 3, 3, rng).padding(1),
        &randn(&[2, 2, 5, 5], 4),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(2, 3, 3, rng).stride(2).without_bias(),
        &randn(&[2, 2, 7, 6], 5),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(3, 2, 1, rng),
        &randn(&[2, 3, 3, 3], 6),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(1, 2, 2, rng).stride(2).padding(1),
        &randn(&[1, 1, 5, 5], 7),
        Mode::Train,
    );
    // Stride 1 computes the input gradient as a convolution with the flipped kernel and
    // padding k - 1 - pad: every padding from 0 to k - 1, odd and even kernels.
    check(
        &mut Conv2d::new(2, 3, 3, rng),
        &randn(&[2, 2, 5, 6], 9),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(2, 2, 5, rng).padding(2),
        &randn(&[2, 2, 6, 5], 10),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(1, 2, 2, rng),
        &randn(&[2, 1, 4, 5], 11),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(2, 2, 3, rng).padding(2).without_bias(),
        &randn(&[1, 2, 3, 4], 12),
        Mode::Train,
    );
    // Batch larger than the thread count takes the parallel-over-samples path.
    check(
        &mut Conv2d::new(2, 2, 3, rng).padding(1),
        &randn(&[6, 2, 4, 4], 8),
        Mode::Train,
    );
    // More than 4 input channels, windows 3 wide: the weight gradient with vectors along output
    // channels (17 channels: whole vectors and a padded one on either instruction set).
    check(
        &mut Conv2d::new(5, 17, 3, rng).padding(1),
        &randn(&[3, 5, 4, 5], 13),
        Mode::Train,
    );
    check(
        &mut Conv2d::new(6, 3, 3, rng).without_bias(),
        &randn(&[2, 6, 5, 4], 14),
        Mode::Train,
    );
    // 16 channels or more, 3x3 windows: the forward, the input and the weight gradients by
    // Winograd's F(2x2, 3x3) on x86-64 with AVX2 or AVX-512; every padding, so that the input
    // gradient's padding 2 - pad takes each value, and odd sizes (tiles cut by the edge).
    for (pad, seed) in [(1, 15), (0, 16), (2, 17)] {
        check(
            &mut Conv2d::new(16, 16, 3, rng).padding(pad),
            &randn(&[2, 16, 5, 6], seed),
            Mode::Train,
        );
    }
}

#[test]
fn pooling() {
    check(
        &mut MaxPool2d::new(2),
        &spaced(&[2, 2, 6, 6], 1),
        Mode::Train,
    );
    check(
        &mut MaxPool2d::new(3).stride(2).padding(1),
        &spaced(&[2, 2, 7, 7], 2),
        Mode::Train,
    );
    check(
        &mut AvgPool2d::new(2),
        &randn(&[2, 2, 6, 6], 3),
        Mode::Train,
    );
    check(
        &mut AvgPool2d::new(3).stride(2).padding(1),
        &randn(&[2, 2, 7, 7], 4),
        Mode::Train,
    );
    check(
        &mut GlobalAvgPool::new(),
        &randn(&[2, 3, 4, 5], 5),
        Mode::Train,
    );
}

#[test]
fn fractional_max_pool() {
    // Random regions in training (the same ones in every evaluation, via reseed), fixed in eval.
    both_modes(
        &mut FractionalMaxPool2d::with_ratio(2, 0.7),
        &spaced(&[2, 2, 10, 10], 6),
    );
    both_modes(
        &mut FractionalMaxPool2d::with_output_size(3, 4, 4),
        &spaced(&[1, 3, 9, 8], 7),
    );
}

#[test]
fn batch_norm() {
    let mut bn = BatchNorm::d1(4);
    bn.forward(&randn(&[8, 4], 9), &Ctx::train()).unwrap(); // non-trivial running statistics
    both_modes(&mut bn, &randn(&[5, 4], 10));
    let mut bn = BatchNorm::d2(3);
    bn.forward(&randn(&[4, 3, 3, 3], 11), &Ctx::train())
        .unwrap();
    both_modes(&mut bn, &randn(&[2, 3, 3, 4], 12));
}

#[test]
fn dropout() {
    both_modes(&mut Dropout::new(0.3).unwrap(), &randn(&[4, 10], 13));
}

#[test]
fn flatten() {
    check(&mut Flatten::new(), &randn(&[2, 3, 2, 2], 14), Mode::Train);
}

#[test]
fn maxout() {
    let rng = &mut Rng::new(3);
    check(
        &mut Maxout::new(5, 4, 2, rng).unwrap(),
        &randn(&[3, 5], 15),
        Mode::Train,
    );
    check(
        &mut Maxout::new(4, 3, 3, rng).unwrap(),
        &randn(&[2, 4], 16),
        Mode::Train,
    );
}

#[test]
fn activations() {
    let ops = [
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Relu,
        Unary::LeakyRelu(0.01),
        Unary::LeakyRelu(0.3),
        Unary::Elu(1.0),
        Unary::Elu(0.5),
        Unary::Selu,
        Unary::Softplus {
            beta: 1.0,
            threshold: 20.0,
        },
        Unary::Softplus {
            beta: 2.0,
            threshold: 20.0,
        },
        Unary::Gelu,
        Unary::Mish,
        Unary::Swish(1.0),
        Unary::Swish(1.7),
    ];
    for op in ops {
        // Values spaced 0.1 apart in (-4, 4), none within 0.05 of the kink at 0.
        let x = spaced(&[4, 20], 17)
            .to_vec()
            .iter()
            .map(|v| v * 2.0)
            .collect();
        check(
            &mut Activation::new(op),
            &Tensor::from_vec(&[4, 20], x).unwrap(),
            Mode::Train,
        );
    }
    check(&mut Softmax::new(), &randn(&[3, 5], 18), Mode::Train);
    check(&mut Softmax::new(), &randn(&[2, 3, 4], 19), Mode::Train);
}

#[test]
fn prelu_and_learned_swish() {
    let mut p = PReLU::new(3);
    p.a.value = Tensor::from_vec(&[3], vec![0.1, -0.2, 0.5]).unwrap();
    check(&mut p, &spaced(&[2, 3, 4], 20), Mode::Train);
    check(&mut PReLU::new(1), &spaced(&[4, 5], 21), Mode::Train);
    check(&mut Swish::learned(1.3), &randn(&[3, 6], 22), Mode::Train);
}

fn block(rng: &mut Rng) -> Sequential {
    Sequential::new()
        .push(Conv2d::new(2, 2, 3, rng).padding(1))
        .push(BatchNorm::d2(2))
        .push(tanh())
        .push(Conv2d::new(2, 2, 3, rng).padding(1))
}

#[test]
fn residual_with_and_without_stochastic_depth() {
    let rng = &mut Rng::new(4);
    both_modes(&mut Residual::new(block(rng)), &randn(&[3, 2, 4, 4], 23));
    // Batch 6 with p = 0.5: the seeded draw keeps some branches and drops others. A conv
    // weight feeding a batch norm in training mode has a large third derivative (the batch
    // statistics move with it): a smaller step keeps the truncation error under the tolerance.
    let fine = GradCheck {
        step: 3e-3,
        ..Default::default()
    };
    let mut sd = Residual::new(block(rng)).stochastic_depth(0.5).unwrap();
    check_with(&fine, &mut sd, &randn(&[6, 2, 4, 4], 24), Mode::Train);
    check_with(&fine, &mut sd, &randn(&[6, 2, 4, 4], 24), Mode::Eval);
    let shortcut = Conv2d::new(2, 3, 1, rng).without_bias();
    let branch = Sequential::new()
        .push(Conv2d::new(2, 3, 3, rng).padding(1))
        .push(tanh());
    check(
        &mut Residual::new(branch).with_shortcut(shortcut),
        &randn(&[2, 2, 3, 3], 25),
        Mode::Train,
    );
}

#[test]
fn sequential_mlp_and_cnn() {
    let rng = &mut Rng::new(5);
    let mut mlp = Sequential::new()
        .push(Flatten::new())
        .push(Linear::new(12, 8, rng))
        .push(BatchNorm::d1(8))
        .push(elu(1.0))
        .push(Dropout::new(0.2).unwrap())
        .push(Linear::new(8, 3, rng));
    both_modes(&mut mlp, &randn(&[4, 3, 2, 2], 26));
    let mut cnn = Sequential::new()
        .push(Conv2d::new(1, 3, 3, rng).padding(1))
        .push(BatchNorm::d2(3))
        .push(gelu())
        .push(AvgPool2d::new(2))
        .push(Flatten::new())
        .push(Linear::new(12, 2, rng));
    both_modes(&mut cnn, &randn(&[2, 1, 4, 4], 27));
}

fn check_fn(name: &str, x: &Tensor, f: impl FnMut(&Tensor) -> regimen::Result<(f64, Tensor)>) {
    let report = GradCheck::default().function(name, x, f).unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{name} failed:\n{report}");
}

#[test]
fn losses() {
    let logits = randn(&[5, 4], 28);
    let labels = Indices::from_vec(vec![0, 3, 1, 1, 2]);
    let soft = Softmax::new()
        .forward(&randn(&[5, 4], 29), &Ctx::eval())
        .unwrap();
    for eps in [0.0, 0.1] {
        let ce = CrossEntropy::with_label_smoothing(eps).unwrap();
        check_fn("cross-entropy hard", &logits, |z| {
            let o = ce.forward(z, Target::Hard(&labels))?;
            Ok((o.loss.item() as f64, o.grad))
        });
        check_fn("cross-entropy soft", &logits, |z| {
            let o = ce.forward(z, Target::Soft(&soft))?;
            Ok((o.loss.item() as f64, o.grad))
        });
    }
    let target = randn(&[3, 4], 30);
    check_fn("mse", &randn(&[3, 4], 31), |p| {
        let o = Mse.forward(p, &target)?;
        Ok((o.loss.item() as f64, o.grad))
    });
    // L1 is not differentiable at 0: spaced() keeps every weight at least 0.08 away.
    for p in [
        Penalty::L2 { lambda: 0.1 },
        Penalty::L1 { lambda: 0.1 },
        Penalty::ElasticNet {
            lambda: 0.1,
            beta: 0.7,
        },
    ] {
        check_fn(&format!("{p:?}"), &spaced(&[5, 10], 32), |w| {
            let mut g = Tensor::zeros(w.shape(), w.device());
            p.add_grad(w, &mut g);
            Ok((p.value(w).item() as f64, g))
        });
    }
}

/// A sigmoid whose backward is subtly wrong: it scales the true derivative by `1 + error`.
struct WrongSigmoid {
    error: f32,
    inner: Activation,
}

impl Layer for WrongSigmoid {
    fn describe(&self) -> String {
        format!("WrongSigmoid({})", self.error)
    }
    fn output_shape(&self, input: &[usize]) -> regimen::Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, mode: &Ctx) -> regimen::Result<Tensor> {
        self.inner.forward(x, mode)
    }
    fn backward(&mut self, dy: &Tensor) -> regimen::Result<Tensor> {
        let mut dx = self.inner.backward(dy)?;
        dx.backend().scale(&mut dx, 1.0 + self.error);
        Ok(dx)
    }
}

#[test]
fn the_checker_catches_a_wrong_backward() {
    let x = randn(&[4, 8], 33);
    for (error, should_pass) in [(0.0, true), (0.02, false), (-0.05, false), (1.0, false)] {
        let mut l = WrongSigmoid {
            error,
            inner: sigmoid(),
        };
        let report = GradCheck::default().layer(&mut l, &x, Mode::Train).unwrap();
        assert_eq!(
            report.passed(),
            should_pass,
            "derivative off by {error}:\n{report}"
        );
    }
    // A wrong parameter gradient is caught too: a Linear whose weight gradient is doubled.
    struct DoubleWeightGrad(Linear);
    impl Layer for DoubleWeightGrad {
        fn describe(&self) -> String {
            "DoubleWeightGrad".into()
        }
        fn output_shape(&self, i: &[usize]) -> regimen::Result<Vec<usize>> {
            self.0.output_shape(i)
        }
        fn forward(&mut self, x: &Tensor, m: &Ctx) -> regimen::Result<Tensor> {
            self.0.forward(x, m)
        }
        fn backward(&mut self, dy: &Tensor) -> regimen::Result<Tensor> {
            let before = self.0.weight.grad.clone();
            let dx = self.0.backward(dy)?;
            let be = dy.backend();
            let mut delta = self.0.weight.grad.clone();
            be.axpy(-1.0, &before, &mut delta);
            be.axpy(1.0, &delta, &mut self.0.weight.grad);
            Ok(dx)
        }
        fn visit_params(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut regimen::Param)) {
            self.0.visit_params(p, f)
        }
    }
    let mut l = DoubleWeightGrad(Linear::new(3, 2, &mut Rng::new(6)));
    let report = GradCheck::default()
        .layer(&mut l, &randn(&[2, 3], 34), Mode::Train)
        .unwrap();
    assert!(!report.passed());
    let failed: Vec<&str> = report
        .tensors
        .iter()
        .filter(|t| t.failures > 0)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        failed,
        ["weight"],
        "only the weight gradient is wrong:\n{report}"
    );
}
