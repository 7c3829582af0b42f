//! Golden tests: every layer and loss against PyTorch.
//!
//! The fixtures (`tests/fixtures/*.safetensors`) are written by `tools/golden.py` with fixed
//! seeds; each holds a case's input, parameters, upstream gradient and PyTorch's output, input
//! gradient, parameter gradients and buffers. Here each case is rebuilt in regimen, given the
//! same parameters, and every tensor is compared.

mod common;

use common::{assert_close, Fixture};
use regimen::layer::{zero_grads, Ctx, Layer, Mode};
use regimen::layers::*;
use regimen::loss::{CrossEntropy, Mse, Penalty};
use regimen::{Indices, Rng, Target};

/// Tolerances for f32 results computed with different summation orders.
const ATOL: f32 = 2e-5;
const RTOL: f32 = 1e-4;

fn build(case: &str, fx: &Fixture) -> Box<dyn Layer> {
    let rng = &mut Rng::new(0);
    let conv_bn_branch = |rng: &mut Rng| {
        Sequential::new()
            .push(Conv2d::new(2, 2, 3, rng).padding(1))
            .push(BatchNorm::d2(2))
            .push(relu())
            .push(Conv2d::new(2, 2, 3, rng).padding(1))
    };
    match case {
        "linear" => Box::new(Linear::new(5, 4, rng)),
        "sequential_mlp" => Box::new(
            Sequential::new()
                .push(Linear::new(6, 5, rng))
                .push(tanh())
                .push(Linear::new(5, 3, rng)),
        ),
        "conv_s1p1" => Box::new(Conv2d::new(2, 3, 3, rng).padding(1)),
        "conv_s2p0_nobias" => Box::new(Conv2d::new(2, 3, 3, rng).stride(2).without_bias()),
        "conv_1x1" => Box::new(Conv2d::new(3, 4, 1, rng)),
        "conv_s2p1" => Box::new(Conv2d::new(2, 3, 3, rng).stride(2).padding(1)),
        "conv_wide" => Box::new(Conv2d::new(6, 20, 3, rng).padding(1)),
        "maxpool_k2" => Box::new(MaxPool2d::new(2)),
        "maxpool_k3s2p1" => Box::new(MaxPool2d::new(3).stride(2).padding(1)),
        "avgpool_k2" => Box::new(AvgPool2d::new(2)),
        "avgpool_k3s2p1" => Box::new(AvgPool2d::new(3).stride(2).padding(1)),
        "global_avg_pool" => Box::new(GlobalAvgPool::new()),
        "fractional_max_pool" => {
            let mut l = FractionalMaxPool2d::with_output_size(2, 4, 5);
            l.set_samples(
                fx.meta["samples"]
                    .split(',')
                    .map(|v| v.parse().unwrap())
                    .collect(),
            );
            Box::new(l)
        }
        c if c.starts_with("batchnorm1d") => Box::new(BatchNorm::d1(4)),
        c if c.starts_with("batchnorm2d") => Box::new(BatchNorm::d2(3)),
        "maxout" => Box::new(Maxout::new(5, 4, 3, rng).unwrap()),
        "act_softmax" => Box::new(Softmax::new()),
        "act_swish_1.5" => Box::new(swish(1.5)),
        c if c.starts_with("act_") => {
            let spec = c
                .trim_start_matches("act_")
                .replace("_1", "")
                .replace("_0", ":0")
                .replace("swish", "swish:1");
            Box::new(Activation::new(parse_activation(&spec).unwrap()))
        }
        "prelu_channels" => Box::new(PReLU::new(3)),
        "prelu_shared" => Box::new(PReLU::new(1)),
        "swish_learned" => Box::new(Swish::learned(0.8)),
        "residual_train" => Box::new(Residual::new(conv_bn_branch(rng))),
        "residual_sd0.2_eval" => Box::new(
            Residual::new(conv_bn_branch(rng))
                .stochastic_depth(0.2)
                .unwrap(),
        ),
        other => panic!("no regimen layer for case {other}"),
    }
}

fn check_layer_case(case: &str) {
    let fx = Fixture::load(case);
    let mut layer = build(case, &fx);
    // Same parameters and buffers as PyTorch; every fixture parameter must be used.
    let mut used = 0;
    layer.visit_params("", &mut |name, p| {
        p.value = fx.tensor(&format!("p.{name}"));
        used += 1;
    });
    assert_eq!(
        used,
        fx.keys_with_prefix("p.").len(),
        "{case}: parameter names differ from PyTorch's"
    );
    layer.visit_buffers("", &mut |name, b| *b = fx.tensor(&format!("bi.{name}")));
    zero_grads(layer.as_mut());
    let mode = if fx.meta["mode"] == "eval" {
        Mode::Eval
    } else {
        Mode::Train
    };

    let y = layer.forward(&fx.tensor("x"), &Ctx::new(mode)).unwrap();
    assert_close(&format!("{case} y"), &y, &fx.tensor("y"), ATOL, RTOL);
    let dx = layer.backward(&fx.tensor("dy")).unwrap();
    assert_close(&format!("{case} dx"), &dx, &fx.tensor("dx"), ATOL, RTOL);
    layer.visit_params("", &mut |name, p| {
        assert_close(
            &format!("{case} grad {name}"),
            &p.grad,
            &fx.tensor(&format!("g.{name}")),
            ATOL,
            RTOL,
        );
    });
    let mut buffers = 0;
    layer.visit_buffers("", &mut |name, b| {
        assert_close(
            &format!("{case} buffer {name}"),
            b,
            &fx.tensor(&format!("b.{name}")),
            ATOL,
            RTOL,
        );
        buffers += 1;
    });
    assert_eq!(buffers, fx.keys_with_prefix("b.").len(), "{case}: buffers");
}

macro_rules! layer_cases {
    ($($test:ident => $case:literal),* $(,)?) => {
        $(#[test] fn $test() { check_layer_case($case); })*
    };
}

layer_cases! {
    linear => "linear",
    sequential_mlp => "sequential_mlp",
    conv_stride1_pad1 => "conv_s1p1",
    conv_stride2_no_bias => "conv_s2p0_nobias",
    conv_pointwise => "conv_1x1",
    conv_stride2_pad1 => "conv_s2p1",
    conv_many_channels => "conv_wide",
    maxpool_k2 => "maxpool_k2",
    maxpool_k3_s2_p1 => "maxpool_k3s2p1",
    avgpool_k2 => "avgpool_k2",
    avgpool_k3_s2_p1 => "avgpool_k3s2p1",
    global_avg_pool => "global_avg_pool",
    fractional_max_pool => "fractional_max_pool",
    batchnorm1d_train => "batchnorm1d_train",
    batchnorm1d_eval => "batchnorm1d_eval",
    batchnorm2d_train => "batchnorm2d_train",
    batchnorm2d_eval => "batchnorm2d_eval",
    maxout => "maxout",
    act_sigmoid => "act_sigmoid",
    act_tanh => "act_tanh",
    act_relu => "act_relu",
    act_leaky_relu => "act_leaky_relu_0.1",
    act_elu => "act_elu_1",
    act_elu_alpha_half => "act_elu_0.5",
    act_selu => "act_selu",
    act_softplus => "act_softplus",
    act_gelu => "act_gelu",
    act_mish => "act_mish",
    act_swish_silu => "act_swish_1",
    act_swish_fixed_beta => "act_swish_1.5",
    act_softmax => "act_softmax",
    prelu_per_channel => "prelu_channels",
    prelu_shared => "prelu_shared",
    swish_learned_beta => "swish_learned",
    residual => "residual_train",
    residual_stochastic_depth_eval => "residual_sd0.2_eval",
}

fn loss_case(case: &str, f: impl Fn(&Fixture) -> regimen::loss::LossOutput) {
    let fx = Fixture::load(case);
    let out = f(&fx);
    assert_close(
        &format!("{case} loss"),
        &out.loss,
        &fx.tensor("loss"),
        ATOL,
        RTOL,
    );
    assert_close(
        &format!("{case} dx"),
        &out.grad,
        &fx.tensor("dx"),
        ATOL,
        RTOL,
    );
}

fn labels(fx: &Fixture) -> Indices {
    Indices::from_vec(
        fx.tensor("labels")
            .to_vec()
            .iter()
            .map(|&v| v as u32)
            .collect(),
    )
}

#[test]
fn cross_entropy_hard_labels() {
    loss_case("ce_hard", |fx| {
        CrossEntropy::new()
            .forward(&fx.tensor("x"), Target::Hard(&labels(fx)))
            .unwrap()
    });
}

#[test]
fn cross_entropy_label_smoothing() {
    loss_case("ce_hard_smooth0.1", |fx| {
        CrossEntropy::with_label_smoothing(0.1)
            .unwrap()
            .forward(&fx.tensor("x"), Target::Hard(&labels(fx)))
            .unwrap()
    });
}

#[test]
fn cross_entropy_soft_labels() {
    loss_case("ce_soft", |fx| {
        CrossEntropy::new()
            .forward(&fx.tensor("x"), Target::Soft(&fx.tensor("target")))
            .unwrap()
    });
}

#[test]
fn cross_entropy_soft_labels_smoothed() {
    loss_case("ce_soft_smooth0.2", |fx| {
        CrossEntropy::with_label_smoothing(0.2)
            .unwrap()
            .forward(&fx.tensor("x"), Target::Soft(&fx.tensor("target")))
            .unwrap()
    });
}

#[test]
fn mse() {
    loss_case("mse", |fx| {
        Mse.forward(&fx.tensor("x"), &fx.tensor("target")).unwrap()
    });
}

fn penalty_case(case: &str, p: Penalty) {
    loss_case(case, |fx| {
        let w = fx.tensor("x");
        let mut g = regimen::Tensor::zeros(w.shape(), w.device());
        p.add_grad(&w, &mut g);
        regimen::loss::LossOutput {
            loss: p.value(&w),
            grad: g,
        }
    });
}

#[test]
fn penalties() {
    penalty_case("penalty_l2_0.01", Penalty::L2 { lambda: 0.01 });
    penalty_case("penalty_l1_0.01", Penalty::L1 { lambda: 0.01 });
    penalty_case(
        "penalty_elastic_0.01_0.5",
        Penalty::ElasticNet {
            lambda: 0.01,
            beta: 0.5,
        },
    );
}
