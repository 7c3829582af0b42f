//! The `Layer` trait: explicit forward and backward, as the lecture teaches backpropagation.
//!
//! `forward(x, ctx)` computes the output and, when the context asks for it (always in
//! training), caches what backward needs; `backward(dy)` returns `dx` and **accumulates**
//! (`+=`) into the gradients of the layer's parameters, so gradients of several batches add up
//! until the optimizer zeroes them.
//!
//! The mode is explicit in every call ([`Ctx::train`], [`Ctx::eval`]): dropout and batch norm
//! behave differently in training and evaluation, "a very common source of bugs" (the
//! lecture). An evaluation forward caches nothing (inference keeps no activations); backward
//! after an evaluation forward is allowed when the context keeps the cache
//! ([`Ctx::keep_cache`], for gradient checks and saliency), and differentiates the
//! evaluation-mode function.
//!
//! The context also carries the training step, on the device, which keys every random draw
//! (dropout masks, stochastic depth, fractional pooling: see [`crate::rng`]); and the
//! precision of matrix products ([`Precision`]).

use crate::error::Result;
use crate::tensor::{DType, Device, Indices, Tensor};

/// Training or evaluation behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// The element type of matrix products and convolutions in a forward (mixed precision):
/// with `Bf16` or `F16`, Linear and Conv2d round their input and weight to that type and
/// multiply with `f32` accumulation. With `Bf16` the activations that convolutions, batch
/// norm, dropout and linear layers with a fused ReLU hand on are `bf16` tensors too, and so is
/// what they keep of them for backward ([`Precision::activations`], [`Layer::takes_half`]).
/// Master weights, gradients and optimizer state are always `f32`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The element type of matrix-product inputs.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// The element type of the activations that convolutions, batch norm, dropout and linear
    /// layers with a fused ReLU hand on: `bf16` under `Bf16`; `f32` otherwise (`F16` rounds
    /// products only: its range, 6.5e4 at most, is too narrow to store activations without
    /// loss scaling).
    pub fn activations(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            Precision::F32 | Precision::F16 => DType::F32,
        }
    }
}

/// What a forward needs besides its input.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub mode: Mode,
    /// Keep what backward needs. Default: in training only.
    pub cache: bool,
    /// The step counter (one `u32`, on the model's device) that keys random draws; `None`
    /// reads as step 0. The trainer passes the optimizer's counter
    /// ([`crate::optim::Optim::step_counter`]).
    pub step: Option<Indices>,
    pub precision: Precision,
    /// The rank of this process in data-parallel training (0 alone): random layers mix it
    /// into their streams ([`Ctx::stream`]), so that ranks draw different masks.
    pub rank: u32,
    /// This rank's samples over the global batch's (1 in a single process).
    pub share: f32,
    /// The micro-batch within an accumulated update (0 without `accumulate`): random layers
    /// mix it into their streams too, so that the micro-batches of one update draw different
    /// masks although they share the optimizer's step.
    pub micro: u32,
}

impl Ctx {
    /// Training: batch statistics, random masks, caches for backward.
    pub fn train() -> Ctx {
        Ctx {
            mode: Mode::Train,
            cache: true,
            step: None,
            precision: Precision::F32,
            rank: 0,
            share: 1.0,
            micro: 0,
        }
    }

    /// Evaluation (inference): running statistics, no randomness, nothing cached.
    pub fn eval() -> Ctx {
        Ctx {
            mode: Mode::Eval,
            cache: false,
            step: None,
            precision: Precision::F32,
            rank: 0,
            share: 1.0,
            micro: 0,
        }
    }

    /// The context of `mode` (with caches, so that backward can follow either way).
    pub fn new(mode: Mode) -> Ctx {
        match mode {
            Mode::Train => Ctx::train(),
            Mode::Eval => Ctx::eval().keep_cache(),
        }
    }

    /// Keep caches for backward (an evaluation forward does not by default).
    pub fn keep_cache(mut self) -> Ctx {
        self.cache = true;
        self
    }

    /// Key random draws by this step counter.
    pub fn at_step(mut self, step: &Indices) -> Ctx {
        self.step = Some(step.clone());
        self
    }

    pub fn with_precision(mut self, precision: Precision) -> Ctx {
        self.precision = precision;
        self
    }

    /// Draw as data-parallel rank `rank` (see [`Ctx::stream`]), which holds `share` of the
    /// global batch (synchronized batch norm weighs its gradient sums by it).
    pub fn on_rank(mut self, rank: usize, share: f32) -> Ctx {
        self.rank = rank as u32;
        self.share = share;
        self
    }

    /// Draw as micro-batch `micro` of an accumulated update (see [`Ctx::stream`]).
    pub fn at_micro(mut self, micro: usize) -> Ctx {
        self.micro = micro as u32;
        self
    }

    /// A random layer's stream as this context draws it: the layer's own on rank 0 (and in a
    /// single process) and micro-batch 0, a different one on every other rank and micro-batch.
    pub fn stream(&self, layer_stream: u64) -> u64 {
        let s = match self.rank {
            0 => layer_stream,
            r => crate::rng::mix64(layer_stream ^ crate::rng::mix64(0xD15_7000 + r as u64)),
        };
        match self.micro {
            0 => s,
            m => crate::rng::mix64(s ^ crate::rng::mix64(0xACC_0000 + m as u64)),
        }
    }

    pub fn is_train(&self) -> bool {
        self.mode == Mode::Train
    }

    /// The step counter on `device` (a zero counter when none was given).
    pub fn step_on(&self, device: Device) -> Indices {
        match &self.step {
            Some(s) if s.device() == device => s.clone(),
            Some(s) => s.to_device(device),
            None => Indices::zeros(1, device),
        }
    }
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

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor>;

    /// `dx` for `dy`; accumulates parameter gradients.
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor>;

    /// Visit learnable parameters with PyTorch-style names under `prefix` (`fc1.weight`).
    fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Param)) {}

    /// Visit learnable parameters in the same order as [`Layer::visit_params`], without their
    /// names: the per-step path of the optimizer, which formats no strings. The default calls
    /// `visit_params`; layers with parameters override it.
    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.visit_params("", &mut |_, p| f(p));
    }

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

    /// Set the random stream key of this layer (and derive its children's): with the step of
    /// the context, it keys dropout masks, stochastic depth and fractional pooling regions
    /// ([`crate::rng`]), so the same key and step reproduce them exactly.
    fn reseed(&mut self, _seed: u64) {}

    /// Child layers with their names, for summaries and hooks. Leaves have none.
    fn children(&self) -> Vec<(String, &dyn Layer)> {
        Vec::new()
    }

    /// Backward in parts: like [`Layer::backward`], calling `ready` with each part whose
    /// parameter gradients are final as soon as they are (a container's children, last
    /// first), so that a data-parallel run starts summing them while backward goes on. `None`
    /// (the default): this layer has no parts; call `backward`.
    fn backward_in_parts(
        &mut self,
        _dy: &Tensor,
        _ready: &mut dyn FnMut(&mut dyn Layer),
    ) -> Option<Result<Tensor>> {
        None
    }

    /// Synchronized batch norm: batch-norm layers in this layer (and below) compute their
    /// batch statistics over all data-parallel ranks ([`crate::dist`]) instead of this
    /// rank's batch alone. Containers pass it on.
    fn sync_batch_norm(&mut self, _on: bool) {}

    /// Whether this layer takes a 16-bit (`bf16`) input as it is. `false` (the default):
    /// `Sequential` converts a 16-bit activation to `f32` before this layer. A layer that
    /// says `true` computes from the 16-bit values and returns its input gradient in `f32`.
    fn takes_half(&self) -> bool {
        false
    }

    /// Whether this layer is a plain ReLU, which the layer before it may apply in its own
    /// passes over memory ([`Layer::forward_relu`]).
    fn is_relu(&self) -> bool {
        false
    }

    /// Forward followed by a ReLU, computed in this layer's own passes; the next
    /// [`Layer::backward`] then takes the gradient of the ReLU's output. `None` (the default):
    /// this layer cannot, and nothing was done. `Sequential` uses it for a layer followed by a
    /// ReLU (batch norm in training, a linear layer), unless a forward hook must see the
    /// layer's own output.
    fn forward_relu(&mut self, _x: &Tensor, _ctx: &Ctx) -> Option<Result<Tensor>> {
        None
    }

    /// This layer as a dropout that a layer and a ReLU before it may apply in their pass
    /// ([`Layer::forward_relu_dropout`]): its drop probability and its random stream (the one
    /// [`Layer::reseed`] gave it). `None` (the default): not a dropout.
    fn as_dropout(&self) -> Option<(f32, u64)> {
        None
    }

    /// Forward followed by a ReLU and a dropout of probability `p` drawing the dropout
    /// layer's masks (its `stream`), computed in this layer's own passes; the next
    /// [`Layer::backward`] then takes the gradient of the dropout's output. `None` (the
    /// default): this layer cannot, and nothing was done. `Sequential` tries it for a layer
    /// followed by a ReLU and a dropout (a linear layer), unless a forward hook must see every
    /// output.
    fn forward_relu_dropout(
        &mut self,
        _x: &Tensor,
        _ctx: &Ctx,
        _p: f32,
        _stream: u64,
    ) -> Option<Result<Tensor>> {
        None
    }

    /// Whether this layer is a 2x2 max pool of stride 2 without padding, which a layer
    /// followed by a ReLU and then this pool may apply in its own passes
    /// ([`Layer::forward_relu_pool`]).
    fn is_max_pool_2x2(&self) -> bool {
        false
    }

    /// Forward followed by a ReLU and a 2x2 max pool of stride 2, computed in this layer's own
    /// passes; the next [`Layer::backward`] then takes the gradient of the pool's output.
    /// `None` (the default): this layer cannot (or not for this input), and nothing was done.
    /// `Sequential` tries it for a layer followed by a ReLU and such a pool (batch norm in
    /// training, on a backend that fuses them), unless a forward hook must see every output.
    fn forward_relu_pool(&mut self, _x: &Tensor, _ctx: &Ctx) -> Option<Result<Tensor>> {
        None
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
    layer.visit_params_unnamed(&mut |p| n += p.value.numel());
    n
}

/// Set every parameter gradient to zero.
pub fn zero_grads(layer: &mut dyn Layer) {
    layer.visit_params_unnamed(&mut |p| p.zero_grad());
}

/// Move every parameter and buffer to `device`.
pub fn to_device(layer: &mut dyn Layer, device: Device) {
    layer.visit_params("", &mut |_, p| p.to_device(device));
    layer.visit_buffers("", &mut |_, b| *b = b.to_device(device));
}

/// Plain gradient descent `theta -= lr * grad` over every parameter (the optimizers of
/// `optim` build on the same visit).
pub fn sgd_step(layer: &mut dyn Layer, lr: f32) {
    layer.visit_params_unnamed(&mut |p| p.value.backend().axpy(-lr, &p.grad, &mut p.value));
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

/// Store `value()` in a layer's cache slot when the context keeps caches; otherwise clear
/// the slot (an evaluation forward keeps no activations, and a stale cache must not survive).
pub(crate) fn keep<T>(ctx: &Ctx, slot: &mut Option<T>, value: impl FnOnce() -> T) {
    *slot = if ctx.cache { Some(value()) } else { None };
}
