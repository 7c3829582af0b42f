//! Built-in models: the ones the command line trains and the benchmark workloads of
//! `BENCH.md`. Each is an ordinary [`Sequential`]; build your own the same way.

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

/// BENCH.md's mlp-step model: Linear 784->512, ReLU, Dropout 0.2, Linear 512->512, ReLU,
/// Dropout 0.2, Linear 512->10.
pub fn bench_mlp(rng: &mut Rng) -> Result<Sequential> {
    mlp(784, &[512, 512], 10, Unary::Relu, 0.2, rng)
}

/// BENCH.md's cnn-step model for 1x28x28 input: [conv3x3 -> BN -> ReLU] x2 (32 ch), maxpool 2,
/// [same] x2 (64 ch), maxpool 2, dropout 0.25, Linear 3136->256, ReLU, dropout 0.25,
/// Linear 256->10.
pub fn bench_cnn(rng: &mut Rng) -> Result<Sequential> {
    let mut m = Sequential::new();
    m = conv_bn_relu(m, 1, 32, rng);
    m = conv_bn_relu(m, 32, 32, rng);
    m = m.push(MaxPool2d::new(2));
    m = conv_bn_relu(m, 32, 64, rng);
    m = conv_bn_relu(m, 64, 64, rng);
    Ok(m.push(MaxPool2d::new(2))
        .push(Dropout::new(0.25)?)
        .push(Flatten::new())
        .push(Linear::new(3136, 256, rng))
        .push(Activation::new(Unary::Relu))
        .push(Dropout::new(0.25)?)
        .push(Linear::new(256, 10, rng)))
}

/// A small CNN for the 8x8 digits: [conv3x3 -> BN -> ReLU] (16 ch), maxpool 2,
/// [conv3x3 -> BN -> ReLU] (32 ch), global average pool, Linear 32->10.
pub fn digits_cnn(rng: &mut Rng) -> Result<Sequential> {
    let mut m = conv_bn_relu(Sequential::new(), 1, 16, rng);
    m = m.push(MaxPool2d::new(2));
    m = conv_bn_relu(m, 16, 32, rng);
    Ok(m.push(GlobalAvgPool::new()).push(Linear::new(32, 10, rng)))
}

/// The names [`by_name`] knows.
pub const NAMES: &[&str] = &["digits-mlp", "digits-cnn", "mlp", "cnn"];

/// A built-in model by name, and the shape of one input sample.
pub fn by_name(name: &str, rng: &mut Rng) -> Result<(Sequential, Vec<usize>)> {
    Ok(match name {
        "digits-mlp" => (mlp(64, &[128], 10, Unary::Relu, 0.0, rng)?, vec![1, 8, 8]),
        "digits-cnn" => (digits_cnn(rng)?, vec![1, 8, 8]),
        "mlp" => (bench_mlp(rng)?, vec![1, 28, 28]),
        "cnn" => (bench_cnn(rng)?, vec![1, 28, 28]),
        other => {
            return Err(Error::config(
                "model",
                other,
                &format!("expected one of {}", NAMES.join(", ")),
            ))
        }
    })
}
