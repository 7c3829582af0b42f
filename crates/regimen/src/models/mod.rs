//! Built-in models: the ones the command line trains and the benchmark workloads of
//! `bench/README.md`. Each is an ordinary [`Sequential`]; build your own the same way.

use crate::backend::Unary;
use crate::error::{Error, Result};
use crate::layers::{
    Activation, BatchNorm, Conv2d, Dropout, Flatten, GlobalAvgPool, Linear, MaxPool2d, Sequential,
};
use crate::rng::Rng;

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

/// The cnn-step benchmark model for 1x28x28 input: [conv3x3 -> BN -> ReLU] x2 (32 ch), maxpool 2,
/// [same] x2 (64 ch), maxpool 2, dropout 0.25, Linear 3136->256, ReLU, dropout 0.25,
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

/// The names [`by_name`] knows.
pub const NAMES: &[&str] = &["digits-mlp", "digits-cnn", "mlp", "cnn"];

/// A built-in model by name for `[C, H, W]` inputs and `classes` classes:
/// `digits-mlp` (one hidden layer of 128), `digits-cnn` (two conv blocks and global pooling),
/// `mlp` and `cnn` (the benchmark models of `bench/README.md`).
pub fn for_input(
    name: &str,
    input: [usize; 3],
    classes: usize,
    rng: &mut Rng,
) -> Result<Sequential> {
    let d: usize = input.iter().product();
    match name {
        "digits-mlp" => mlp(d, &[128], classes, Unary::Relu, 0.0, rng),
        "digits-cnn" => small_cnn(input, classes, rng),
        "mlp" => mlp(d, &[512, 512], classes, Unary::Relu, 0.2, rng),
        "cnn" => cnn(input, classes, rng),
        other => Err(Error::config(
            "model",
            other,
            &format!("expected one of {}", NAMES.join(", ")),
        )),
    }
}

/// The number of learnable parameters of built-in model `name` for `[C, H, W]` inputs and
/// `classes` classes, computed without building it: a checkpoint's metadata can be checked
/// against the tensors in the file before any memory is allocated for the model.
pub fn param_count(name: &str, input: [usize; 3], classes: usize) -> Result<usize> {
    let [c, h, w] = input;
    let d = c.checked_mul(h).and_then(|v| v.checked_mul(w));
    let linear = |i: usize, o: usize| i.checked_mul(o).and_then(|v| v.checked_add(o));
    let conv_bn = |i: usize, o: usize| o * i * 9 + 2 * o; // 3x3, no bias; BN weight and bias
    let too_big = || {
        Error::config(
            "model size",
            name,
            "overflows (absurd input shape or classes)",
        )
    };
    let n = match name {
        "digits-mlp" => {
            let d = d.ok_or_else(too_big)?;
            linear(d, 128).zip(linear(128, classes)).map(|(a, b)| a + b)
        }
        "mlp" => {
            let d = d.ok_or_else(too_big)?;
            linear(d, 512)
                .zip(linear(512, classes))
                .map(|(a, b)| a + b + 512 * 512 + 512)
        }
        "digits-cnn" => linear(32, classes).map(|l| conv_bn(c, 16) + conv_bn(16, 32) + l),
        "cnn" => (h / 4)
            .checked_mul(w / 4)
            .and_then(|hw| hw.checked_mul(64))
            .and_then(|f| linear(f, 256))
            .zip(linear(256, classes))
            .map(|(a, b)| {
                conv_bn(c, 32) + conv_bn(32, 32) + conv_bn(32, 64) + conv_bn(64, 64) + a + b
            }),
        other => {
            return Err(Error::config(
                "model",
                other,
                &format!("expected one of {}", NAMES.join(", ")),
            ))
        }
    };
    n.ok_or_else(too_big)
}

/// A built-in model by name with its usual input: 8x8 digits for `digits-*`, 28x28 otherwise.
pub fn by_name(name: &str, rng: &mut Rng) -> Result<(Sequential, Vec<usize>)> {
    let input = if name.starts_with("digits") {
        [1, 8, 8]
    } else {
        [1, 28, 28]
    };
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
    }
}
