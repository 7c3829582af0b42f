//! The device boundary: every numeric operation a layer, loss or optimizer needs.
//!
//! Layers are written once against [`Backend`]; each device implements it. The operations are
//! coarse (a whole convolution, a whole batch-norm pass, a fused softmax cross-entropy) so that
//! each device can use its best kernel (im2col + `gemm` on the CPU; cuDNN/cuBLAS or a fused
//! kernel on the GPU) and so that a training step never needs a round trip through the host:
//! losses and counts come back as one-element tensors that stay on the device until read.
//!
//! Shapes are checked by the layers before they call the backend; a backend may assume them.

pub mod cpu;

use crate::tensor::{Indices, Tensor};

/// An element-wise activation `y = f(x)`. The formulas are on [`crate::layers::Activation`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Sigmoid,
    Tanh,
    Relu,
    /// `max(0, x) + slope * min(0, x)`
    LeakyRelu(f32),
    /// alpha
    Elu(f32),
    Selu,
    /// `(1/beta) ln(1 + exp(beta x))`, linear where `beta x > threshold`.
    Softplus {
        beta: f32,
        threshold: f32,
    },
    /// Exact (erf) form.
    Gelu,
    Mish,
    /// `x sigmoid(beta x)` with a fixed beta (a learned beta is [`Backend::swish_forward`]).
    Swish(f32),
}

/// Geometry of a 2-D convolution or pooling window over an `[N, C, H, W]` input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Window {
    /// Output size along one axis: `floor((n + 2 pad - k) / stride) + 1` (PyTorch's rule).
    /// `None` when the window does not fit.
    pub fn out_len(&self, n: usize, k: usize) -> Option<usize> {
        let padded = n + 2 * self.pad;
        if padded < k || self.stride == 0 {
            None
        } else {
            Some((padded - k) / self.stride + 1)
        }
    }
}

/// The target of a cross-entropy loss.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// One class index per row.
    Hard(&'a Indices),
    /// One probability distribution per row, shape `[N, C]` (from Mixup, CutMix...).
    Soft(&'a Tensor),
}

/// The numeric operations of one device. See the module doc.
///
/// Conventions: image tensors are `[N, C, H, W]`; "channel" tensors are `[N, C, inner]` where
/// `inner` is the product of the trailing dimensions (1 for `[N, C]`); functions whose name ends
/// in `_backward` accumulate (`+=`) into parameter gradients and return the input gradient.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    // ---- memory
    fn zeros(&self, shape: &[usize]) -> Tensor;
    fn to_host(&self, t: &Tensor) -> Vec<f32>;
    fn fill(&self, t: &mut Tensor, value: f32);

    // ---- linear algebra and element-wise arithmetic
    /// `c = op(a) op(b)` (or `c += ...` when `accumulate`), `op` transposing when asked.
    /// `a`, `b`, `c` are 2-D.
    fn matmul(
        &self,
        a: &Tensor,
        trans_a: bool,
        b: &Tensor,
        trans_b: bool,
        c: &mut Tensor,
        accumulate: bool,
    );
    /// `y[n, c, i] += bias[c]` for `y` of shape `[N, C, inner]`.
    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor, channels: usize);
    /// `dbias[c] += sum_{n,i} dy[n, c, i]`.
    fn channel_bias_backward(&self, dy: &Tensor, dbias: &mut Tensor, channels: usize);
    /// `y += alpha x`
    fn axpy(&self, alpha: f32, x: &Tensor, y: &mut Tensor);
    /// `x *= alpha`
    fn scale(&self, x: &mut Tensor, alpha: f32);
    /// `a + b`, element-wise, same shapes.
    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor;
    /// `a * b`, element-wise, same shapes.
    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor;
    /// `y[n, ...] = x[n, ...] * s[n]`: one factor per sample (first axis).
    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Tensor;
    /// `x = clamp(x, lo, hi)`.
    fn clamp(&self, x: &mut Tensor, lo: f32, hi: f32);
    /// One-element tensors: `sum |x|` and `sum x^2`.
    fn sum_abs(&self, x: &Tensor) -> Tensor;
    fn sum_sq(&self, x: &Tensor) -> Tensor;
    /// `g += alpha sign(w)` (sign(0) = 0): the subgradient of an L1 penalty.
    fn add_sign(&self, alpha: f32, w: &Tensor, g: &mut Tensor);

    // ---- activations
    fn unary_forward(&self, op: Unary, x: &Tensor) -> Tensor;
    fn unary_backward(&self, op: Unary, x: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor;
    /// PReLU: `y = x if x > 0 else a[c] x` over `[N, C, inner]` (`a` has C or 1 element).
    fn prelu_forward(&self, x: &Tensor, a: &Tensor, channels: usize) -> Tensor;
    fn prelu_backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        dy: &Tensor,
        da: &mut Tensor,
        channels: usize,
    ) -> Tensor;
    /// Swish with a learned scalar beta (`beta` has one element).
    fn swish_forward(&self, x: &Tensor, beta: &Tensor) -> Tensor;
    fn swish_backward(&self, x: &Tensor, beta: &Tensor, dy: &Tensor, dbeta: &mut Tensor) -> Tensor;
    /// Softmax over axis 1 of `[N, C, inner]`.
    fn softmax_forward(&self, x: &Tensor, channels: usize) -> Tensor;
    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, channels: usize) -> Tensor;

    // ---- convolution and pooling (`[N, C, H, W]`)
    /// `w`: `[OC, C, KH, KW]`; `b`: `[OC]`.
    fn conv2d_forward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: Window) -> Tensor;
    /// Returns `dx`, or an empty tensor when `input_grad` is false.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        win: Window,
        dw: &mut Tensor,
        db: Option<&mut Tensor>,
        input_grad: bool,
    ) -> Tensor;
    /// Max pooling; padding acts as -inf. Returns the output and, per output element, the
    /// position (`h * W + w`) of the maximum within its input plane.
    fn max_pool2d_forward(&self, x: &Tensor, win: Window) -> (Tensor, Indices);
    /// Scatter `dy` to the arg-max positions (shared by max, fractional max pooling and maxout:
    /// `dx[plane, idx] += dy[plane, j]` where each plane of `dy` has `dy_plane` elements and
    /// each plane of `dx` has `x_plane`).
    fn max_backward(
        &self,
        dy: &Tensor,
        idx: &Indices,
        x_shape: &[usize],
        dy_plane: usize,
        x_plane: usize,
    ) -> Tensor;
    /// Average pooling, divisor `kh * kw` (padding counts, as PyTorch's `count_include_pad`).
    fn avg_pool2d_forward(&self, x: &Tensor, win: Window) -> Tensor;
    fn avg_pool2d_backward(&self, dy: &Tensor, x_shape: &[usize], win: Window) -> Tensor;
    /// Mean over each `inner` block of `[N, C, inner]`: output `[N, C]`.
    fn global_avg_pool_forward(&self, x: &Tensor, channels: usize) -> Tensor;
    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: &[usize]) -> Tensor;
    /// Fractional max pooling (Graham 2014) with PyTorch's interval rule: `samples` holds, per
    /// plane (n, c), two numbers in [0, 1): `[u_w, u_h]`.
    fn fractional_max_pool2d_forward(
        &self,
        x: &Tensor,
        kernel: (usize, usize),
        out: (usize, usize),
        samples: &[f32],
    ) -> (Tensor, Indices);
    /// Maxout over groups: `x` is `[N, F * k]`, `y[n, j] = max_{i<k} x[n, j k + i]`.
    fn max_groups_forward(&self, x: &Tensor, k: usize) -> (Tensor, Indices);

    // ---- normalization and noise
    /// Batch-norm with batch statistics over `[N, C, inner]`. Updates the running averages
    /// (`r = (1 - momentum) r + momentum batch`, the variance unbiased) and returns
    /// `(y, mean, invstd)` for backward.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor);
    /// Batch-norm with fixed statistics: `y = gamma (x - mean) invstd + beta`, with
    /// `invstd = 1/sqrt(var + eps)` computed from `var`.
    fn batch_norm_forward_eval(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Tensor;
    /// `invstd` of `var`: `1/sqrt(var + eps)`.
    fn invstd(&self, var: &Tensor, eps: f32) -> Tensor;
    /// Backward of batch-norm. With `batch_stats` the mean and invstd depend on x (training);
    /// without, they are constants (evaluation).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        batch_stats: bool,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor;
    /// Inverted dropout: `mask[i] = (u(seed, i) >= p) / (1 - p)`; returns `(x * mask, mask)`.
    fn dropout_forward(&self, x: &Tensor, p: f32, seed: u64) -> (Tensor, Tensor);

    // ---- optimizers
    /// One optimizer update of parameter `p` with gradient `g` and its state `slots` (as many
    /// as the rule's optimizer asks for, each of `p`'s shape); `step` counts from 1; `wd` is
    /// the weight decay (L2 added to the gradient, or decoupled for AdamW).
    #[allow(clippy::too_many_arguments)]
    fn optim_update(
        &self,
        rule: crate::optim::UpdateRule,
        step: u64,
        lr: f32,
        wd: f32,
        p: &mut Tensor,
        g: &Tensor,
        slots: &mut [Tensor],
    );

    // ---- losses and metrics
    /// Mean softmax cross-entropy over the rows of `logits` `[N, C]`, with label smoothing
    /// `eps` (target `(1 - eps) t + eps / C`). Returns the loss (one element) and
    /// `d loss / d logits` multiplied by `grad_scale`.
    fn softmax_cross_entropy(
        &self,
        logits: &Tensor,
        target: Target<'_>,
        smoothing: f32,
        grad_scale: f32,
    ) -> (Tensor, Tensor);
    /// Mean squared error (one element) and its gradient times `grad_scale`.
    fn mse(&self, pred: &Tensor, target: &Tensor, grad_scale: f32) -> (Tensor, Tensor);
    /// Number of rows whose arg-max equals the label (one element, on the device).
    fn count_correct(&self, logits: &Tensor, labels: &Indices) -> Tensor;
}
