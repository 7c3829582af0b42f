//! Built-in models: the ones the command line trains and the benchmark workloads of
//! `bench/README.md`. Each is an ordinary [`Sequential`]; build your own the same way.

use crate::backend::Unary;
use crate::error::{Error, Result};
use crate::layers::{
    Activation, BatchNorm, Conv2d, Dropout, Flatten, GlobalAvgPool, Linear, MaxPool2d, Sequential,
};
use crate::rng::Rng;

mod spec;
pub use spec::{ModelSpec, Plan, BUILT_IN, NAMES};

/// A multi-layer perceptron on flattened input: `Flatten`, then for each hidden width
/// `Linear -> activation [-> Dropout]`, then `Linear -> classes` (logits).
pub fn mlp(
    input: usize,
    hidden: &[usize],
    classes: usize,
    activation: Unary,
    dropout: f32,
    rng: &mut Rng,
) -> Result<Sequential> {
    let mut m = Sequential::new().push(Flatten::new());
    let mut width = input;
    for &h in hidden {
        m = m
            .push(Linear::new(width, h, rng))
            .push(Activation::new(activation));
        if dropout > 0.0 {
            m = m.push(Dropout::new(dropout)?);
        }
        width = h;
    }
    Ok(m.push(Linear::new(width, classes, rng)))
}

/// `conv3x3 (pad 1, no bias) -> BatchNorm2d -> ReLU`.
fn conv_bn_relu(m: Sequential, cin: usize, cout: usize, rng: &mut Rng) -> Sequential {
    m.push(Conv2d::new(cin, cout, 3, rng).padding(1).without_bias())
        .push(BatchNorm::d2(cout))
        .push(Activation::new(Unary::Relu))
}

/// The mlp-step benchmark model: Linear 784->512, ReLU, Dropout 0.2, Linear 512->512, ReLU,
/// Dropout 0.2, Linear 512->10.
pub fn bench_mlp(rng: &mut Rng) -> Result<Sequential> {
    mlp(784, &[512, 512], 10, Unary::Relu, 0.2, rng)
}

/// The cnn-step benchmark model for 1x28x28 input: \[conv3x3 -> BN -> ReLU\] x2 (32 ch), maxpool 2,
/// \[same\] x2 (64 ch), maxpool 2, dropout 0.25, Linear 3136->256, ReLU, dropout 0.25,
/// Linear 256->10.
pub fn bench_cnn(rng: &mut Rng) -> Result<Sequential> {
    cnn([1, 28, 28], 10, rng)
}

/// The benchmark CNN for any `[C, H, W]` input (H and W divisible by 4) and class count.
pub fn cnn(input: [usize; 3], classes: usize, rng: &mut Rng) -> Result<Sequential> {
    let [c, h, w] = input;
    if h < 4 || w < 4 {
        return Err(Error::config(
            "model cnn",
            format!("{input:?}"),
            "needs images of at least 4x4 (two 2x2 poolings)",
        ));
    }
    let mut m = Sequential::new();
    m = conv_bn_relu(m, c, 32, rng);
    m = conv_bn_relu(m, 32, 32, rng);
    m = m.push(MaxPool2d::new(2));
    m = conv_bn_relu(m, 32, 64, rng);
    m = conv_bn_relu(m, 64, 64, rng);
    Ok(m.push(MaxPool2d::new(2))
        .push(Dropout::new(0.25)?)
        .push(Flatten::new())
        .push(Linear::new(64 * (h / 4) * (w / 4), 256, rng))
        .push(Activation::new(Unary::Relu))
        .push(Dropout::new(0.25)?)
        .push(Linear::new(256, classes, rng)))
}

/// A small CNN for the 8x8 digits: [conv3x3 -> BN -> ReLU] (16 ch), maxpool 2,
/// [conv3x3 -> BN -> ReLU] (32 ch), global average pool, Linear 32->10.
pub fn digits_cnn(rng: &mut Rng) -> Result<Sequential> {
    small_cnn([1, 8, 8], 10, rng)
}

/// The digits CNN for any `[C, H, W]` input (H, W >= 2): global pooling makes it size-agnostic.
pub fn small_cnn(input: [usize; 3], classes: usize, rng: &mut Rng) -> Result<Sequential> {
    if input[1] < 2 || input[2] < 2 {
        return Err(Error::config(
            "model small-cnn",
            format!("{input:?}"),
            "needs images of at least 2x2",
        ));
    }
    let mut m = conv_bn_relu(Sequential::new(), input[0], 16, rng);
    m = m.push(MaxPool2d::new(2));
    m = conv_bn_relu(m, 16, 32, rng);
    Ok(m.push(GlobalAvgPool::new())
        .push(Linear::new(32, classes, rng)))
}

/// A model by built-in name or spec ([`ModelSpec`]) for `[C, H, W]` inputs and `classes`
/// classes: `digits-mlp` (one hidden layer of 128), `digits-cnn` (two conv blocks and global
/// pooling), `mlp` and `cnn` (the benchmark models of `bench/README.md`), `resnet`,
/// `deep-mlp`, or a spec like `conv:32,bn,relu,maxpool:2,flatten,linear:classes`.
pub fn for_input(
    spec: &str,
    input: [usize; 3],
    classes: usize,
    rng: &mut Rng,
) -> Result<Sequential> {
    ModelSpec::parse(spec)?.build(input, classes, rng)
}

/// The number of learnable parameters of model `spec` for `[C, H, W]` inputs and `classes`
/// classes, computed without building it: a checkpoint's metadata can be checked against the
/// tensors in the file before any memory is allocated for the model.
pub fn param_count(spec: &str, input: [usize; 3], classes: usize) -> Result<usize> {
    Ok(ModelSpec::parse(spec)?.plan(input, classes)?.params)
}

/// The usual input of a model by name: 8x8 digits for `digits-*`, 32x32 colour for `resnet*`,
/// 28x28 otherwise.
pub fn default_input(name: &str) -> [usize; 3] {
    if name.starts_with("digits") {
        [1, 8, 8]
    } else if name.starts_with("resnet") {
        [3, 32, 32]
    } else {
        [1, 28, 28]
    }
}

/// A built-in model by name with its usual input ([`default_input`]) and 10 classes.
pub fn by_name(name: &str, rng: &mut Rng) -> Result<(Sequential, Vec<usize>)> {
    let input = default_input(name);
    Ok((for_input(name, input, 10, rng)?, input.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_count_matches_the_built_models() {
        for name in NAMES {
            for (input, classes) in [([1, 8, 8], 10), ([3, 32, 32], 7), ([1, 28, 28], 10)] {
                let Ok(mut m) = for_input(name, input, classes, &mut Rng::new(0)) else {
                    continue;
                };
                assert_eq!(
                    param_count(name, input, classes).unwrap(),
                    crate::layer::param_count(&mut m),
                    "{name} {input:?} {classes}"
                );
            }
        }
        assert!(param_count("mlp", [usize::MAX, 2, 2], 10).is_err());
        for spec in [
            "resnet",
            "resnet:1:8:0.2",
            "deep-mlp:3:20,activation=tanh,init=xavier",
            "conv:8:5:2:2:nobias,bn,prelu,fmp,conv:4,prelu:shared,avgpool:2:1,flatten,maxout:6:3,swish:learned,dropout,linear:classes:nobias",
            "flatten,linear:9,softmax,bn,selu,linear:classes",
        ] {
            let plan = ModelSpec::parse(spec).unwrap().plan([3, 16, 16], 5).unwrap();
            let mut m = for_input(spec, [3, 16, 16], 5, &mut Rng::new(1)).unwrap();
            assert_eq!(plan.params, crate::layer::param_count(&mut m), "{spec}");
            // The plan's shapes are those the layers compute.
            let summary = m.summary(&[3, 16, 16]).unwrap();
            assert_eq!(&summary.rows.last().unwrap().output, plan.shapes.last().unwrap(), "{spec}");
        }
    }

    /// The built-in specs draw the same weights as the constructors they replaced.
    #[test]
    fn built_in_specs_equal_the_constructors() {
        let weights = |m: &mut Sequential| {
            let mut v = Vec::new();
            crate::layer::Layer::visit_params(m, "", &mut |n, p| {
                v.push((n.to_string(), p.value.to_vec()))
            });
            v
        };
        let mut a = for_input("cnn", [1, 28, 28], 10, &mut Rng::new(3)).unwrap();
        let mut b = cnn([1, 28, 28], 10, &mut Rng::new(3)).unwrap();
        assert_eq!(weights(&mut a), weights(&mut b));
        let mut a = for_input("mlp", [1, 28, 28], 10, &mut Rng::new(3)).unwrap();
        let mut b = bench_mlp(&mut Rng::new(3)).unwrap();
        assert_eq!(weights(&mut a), weights(&mut b));
        let mut a = for_input("digits-cnn", [1, 8, 8], 10, &mut Rng::new(3)).unwrap();
        let mut b = digits_cnn(&mut Rng::new(3)).unwrap();
        assert_eq!(weights(&mut a), weights(&mut b));
    }

    #[test]
    fn bad_specs_name_the_token() {
        for (spec, want) in [
            ("flatten,linear:x,linear:classes", "token 2 = linear:x"),
            (
                "conv:8,linear:classes",
                "token 2 = linear:classes: a linear layer takes flat features",
            ),
            ("flatten,linear:10,relu,,linear:classes", "token 4"),
            ("flatten,lineer:10", "unknown layer 'lineer'"),
            ("flatten,linear:7", "the data has 5 classes"),
            (
                "conv:8:17:1:0,gap,linear:classes",
                "token 1 = conv:8:17:1:0: a 17x17 window",
            ),
            (
                "flatten,linear:classes,softmax",
                "the loss applies the softmax itself",
            ),
            ("init=hee,flatten,linear:classes", "token 1 = init=hee"),
            ("mlp:3", "takes no parameters"),
            ("flatten,mlp", "may only open a spec"),
            ("flatten,relu:2,linear:classes", "takes no parameter"),
            ("flatten,dropout:1.5,linear:classes", "in [0, 1)"),
            ("maxpool:2,gap,linear:classes,color=red", "unknown option"),
            (
                "flatten,linear:99999999999,linear:classes",
                "from 1 to 16777216",
            ),
            ("maxpool:64,flatten,linear:classes", "token 1 = maxpool:64"),
        ] {
            let err = ModelSpec::parse(spec)
                .and_then(|s| s.plan([3, 16, 16], 5))
                .expect_err(spec)
                .to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}
