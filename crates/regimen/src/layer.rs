//! The `Layer` trait: explicit forward and backward, as the lecture teaches backpropagation.
//!
//! `forward(x, mode)` computes the output and, in [`Mode::Train`], caches what backward needs;
//! `backward(dy)` returns `dx` and **accumulates** (`+=`) into the gradients of the layer's
//! parameters, so gradients of several batches add up until the optimizer zeroes them.
//! The mode is explicit in every call: dropout and batch norm behave differently in training
//! and evaluation, "a very common source of bugs" (the lecture). Backward after an
//! [`Mode::Eval`] forward is allowed too (for gradient checks and saliency), and differentiates
//! the evaluation-mode function.

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Training or evaluation behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// What a parameter is, so optimizers can choose defaults (no weight decay on biases and
/// normalization parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    /// Scale and shift of a normalization layer, slopes of PReLU, beta of Swish.
    Norm,
}

/// A learnable tensor and its gradient.
#[derive(Clone, Debug)]
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
    pub kind: ParamKind,
}

impl Param {
    pub fn new(value: Tensor, kind: ParamKind) -> Param {
        let grad = Tensor::zeros(value.shape(), value.device());
        Param { value, grad, kind }
    }

    pub fn zero_grad(&mut self) {
        self.grad.backend().fill(&mut self.grad, 0.0);
    }

    pub fn to_device(&mut self, device: Device) {
        self.value = self.value.to_device(device);
        self.grad = self.grad.to_device(device);
    }
}

/// Called with a layer's path and its output after each forward (see [`crate::layers::Sequential::set_hook`]).
pub type ForwardHook = Box<dyn FnMut(&str, &Tensor) + Send>;

/// A differentiable building block. See the module documentation.
pub trait Layer: Send {
    /// A short description, like `Linear(784 -> 512)`: it names the layer in errors and summaries.
    fn describe(&self) -> String;

    /// The output shape for an input shape (batch axis included); an error names the layer
    /// and both shapes when the input does not fit.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>>;

    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor>;

    /// `dx` for `dy`; accumulates parameter gradients.
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor>;

    /// Visit learnable parameters with PyTorch-style names under `prefix` (`fc1.weight`).
    fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Param)) {}

    /// Visit non-learned state saved with a model (`bn.running_mean`).
    fn visit_buffers(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Tensor)) {}

    /// Floating-point operations of one forward pass per sample (a multiply-add counts 2).
    fn flops(&self, _input: &[usize]) -> u64 {
        0
    }

    /// Whether `backward` must compute `dx` (default true). The first layer of a model does not
    /// need it — nothing consumes the gradient of the input data — and skipping it saves a
    /// whole matrix product (a fifth of an MLP's training step). When false, a layer may return
    /// an empty tensor (shape `[0]`) from `backward`; it still accumulates parameter gradients.
    fn set_input_grad(&mut self, _needed: bool) {}

    /// Reset the random stream of this layer (and its children) from `seed`: dropout masks,
    /// stochastic depth and fractional pooling regions are then reproduced exactly.
    fn reseed(&mut self, _seed: u64) {}

    /// Child layers with their names, for summaries and hooks. Leaves have none.
    fn children(&self) -> Vec<(String, &dyn Layer)> {
        Vec::new()
    }
}

/// `name` joined under `prefix` with a dot (PyTorch's naming).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Number of learnable scalars in a layer.
pub fn param_count(layer: &mut dyn Layer) -> usize {
    let mut n = 0;
    layer.visit_params("", &mut |_, p| n += p.value.numel());
    n
}

/// Set every parameter gradient to zero.
pub fn zero_grads(layer: &mut dyn Layer) {
    layer.visit_params("", &mut |_, p| p.zero_grad());
}

/// Move every parameter and buffer to `device`.
pub fn to_device(layer: &mut dyn Layer, device: Device) {
    layer.visit_params("", &mut |_, p| p.to_device(device));
    layer.visit_buffers("", &mut |_, b| *b = b.to_device(device));
}

/// Plain gradient descent `theta -= lr * grad` over every parameter (the optimizers of
/// `optim` build on the same visit).
pub fn sgd_step(layer: &mut dyn Layer, lr: f32) {
    layer.visit_params("", &mut |_, p| {
        p.value.backend().axpy(-lr, &p.grad, &mut p.value)
    });
}

/// The cached value a backward needs, or the error that says forward was not run.
pub(crate) fn cached<'a, T>(slot: &'a Option<T>, layer: &dyn Layer) -> Result<&'a T> {
    slot.as_ref().ok_or_else(|| crate::Error::NoForwardCache {
        layer: layer.describe(),
    })
}

/// Check that `dy` has the shape forward produced.
pub(crate) fn check_dy(layer: &dyn Layer, want: &[usize], dy: &Tensor) -> Result<()> {
    if dy.shape() != want {
        return Err(crate::Error::shape(
            format!("{} backward", layer.describe()),
            format!("{want:?} (the shape of its output)"),
            dy.shape(),
        ));
    }
    Ok(())
}
