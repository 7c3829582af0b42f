//! The device boundary: every numeric operation a layer, loss or optimizer needs.
//!
//! Layers are written once against [`Backend`]; each device implements it in its own module
//! (`cpu/`, `cuda/`) and reaches only its own variant of the tensor storage. The operations
//! are coarse (a whole convolution, a whole batch-norm pass, a fused softmax cross-entropy, one
//! optimizer update over every parameter) so that each device can use its best kernel, and so
//! that a training step never needs a round trip through the host: losses, counts, gradient
//! norms and clipping coefficients come back as one-element tensors that stay on the device;
//! the learning rate and the step count are device scalars that kernels read; random draws
//! are Philox numbers keyed by the device step counter ([`crate::rng`]).
//!
//! The backend owns allocation: outputs come from its buffer pool ([`pool`]), so a
//! steady-state step allocates nothing new. Host reads go through [`strict`].
//!
//! This module imports nothing from `optim`, `layers` or `train`: the dependency points one
//! way, from those to here.
//!
//! Shapes are checked by the layers before they call the backend; a backend may assume them.
//! Element types: values are `f32` unless a method says otherwise; matrix products and
//! convolutions also take `bf16`/`f16` inputs (with `f32` outputs and accumulation).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pool;
pub mod strict;
mod update;

pub use pool::PoolStats;

/// The vector instruction set the CPU kernels use on this machine, found at run time (one
/// binary runs everywhere): `avx512f` (the matrix products' AVX-512 kernels), `avx2+fma`, or
/// `baseline`; `+amx` when the processor also has AMX tiles (reported, not used: AMX multiplies
/// bf16 and int8, and regimen's CPU products are f32).
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let simd = if is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "baseline"
        };
        let amx = std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.split_whitespace().any(|w| w == "amx_tile"))
            .unwrap_or(false);
        // REGIMEN_DIRECT_ISA=avx2 on an AVX-512 machine (bench/compare-avx2) says so.
        let forced = simd == "avx512f" && !cpu::direct::avx512_allowed();
        format!(
            "{simd}{}{}",
            if amx { "+amx" } else { "" },
            if forced {
                " (regimen's kernels held to avx2+fma; the matrix products as gemm was built)"
            } else {
                ""
            }
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}
/// The engines that ran the GPU's f32 convolutions so far: `cudnn` (`REGIMEN_CUDNN=1`),
/// `implicit` (`REGIMEN_CONV=implicit`), `im2col` (im2col + cuBLAS), several joined by `+`,
/// or `none` when no convolution ran, after `auto:` under `REGIMEN_CONV=auto`; `None` on the
/// CPU or when the GPU cannot be used.
pub fn gpu_conv_engine(device: Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        return cuda::get(n).ok().map(|b| b.conv_engine());
    }
    let _ = device;
    None
}

/// On a GPU: one line per convolution shape run so far, under `REGIMEN_CONV=auto` each
/// direction's timings by every engine and the one chosen; with cuDNN loaded
/// (`REGIMEN_CUDNN=1`, or `auto`), the cuDNN algorithms chosen for it (and their math), or
/// why it has none. Empty otherwise.
pub fn gpu_conv_plans(device: Device) -> Vec<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        return cuda::get(n).map(|b| b.conv_plans()).unwrap_or_default();
    }
    let _ = device;
    Vec::new()
}

/// What each operation queued on a GPU took, in order (see [`gpu_kernel_trace`]).
#[derive(Clone, Debug, Default)]
pub struct KernelTrace {
    /// `(operation, microseconds on the GPU)`: a kernel as `name [grid]xblock`, a cuBLAS or
    /// cuDNN call with its shape, a copy or fill with its size.
    pub ops: Vec<(String, f64)>,
    /// How long the host took to queue the traced work.
    pub queued_ms: f64,
    /// How long the GPU was held before it (while the host queued).
    pub hold_ms: f64,
    /// Whether the host waited for the device while tracing (a host read).
    pub synced: bool,
}

impl KernelTrace {
    /// Why the times may include waits for the host rather than the GPU's own work, if they
    /// may.
    pub fn caveat(&self) -> Option<String> {
        if self.synced {
            Some("the host waited for the device while queuing: the operations after that wait include the host's time".into())
        } else if self.queued_ms > self.hold_ms {
            Some(format!(
                "the host took {:.1} ms to queue the work, more than the {:.1} ms hold: the later operations include waits for the host",
                self.queued_ms, self.hold_ms
            ))
        } else {
            None
        }
    }
}

/// Runs `f` and, on a GPU, times every operation it queues ([`KernelTrace`]): the stream is
/// held for `hold_ms` first, so that the GPU runs the queued work back to back and each time is
/// the operation's own. On the CPU `f` just runs (`None`).
pub fn gpu_kernel_trace<R>(
    device: Device,
    hold_ms: f64,
    f: impl FnOnce() -> R,
) -> Result<(R, Option<KernelTrace>)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        let (r, t) = cuda::get(n)?.trace(hold_ms, f)?;
        return Ok((r, Some(t)));
    }
    let _ = (device, hold_ms);
    Ok((f(), None))
}

pub(crate) use update::{
    adagrad as adagrad_element, adam as adam_element, rmsprop as rmsprop_element,
    sgd as sgd_element,
};
pub use update::{update_element, UpdateRule};

use crate::error::Result;
use crate::tensor::{DType, Device, Indices, Tensor};

/// Host-side data for uploads and downloads, by element width.
#[derive(Clone, Debug, PartialEq)]
pub enum HostBuf {
    F32(Vec<f32>),
    /// The bit patterns of `bf16` or `f16` elements.
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl HostBuf {
    /// The values as `f32`, reading 16-bit patterns as `dtype`.
    pub fn into_f32(self, dtype: DType) -> Vec<f32> {
        match self {
            HostBuf::F32(v) => v,
            HostBuf::U16(v) => match dtype {
                DType::BF16 => v
                    .into_iter()
                    .map(|b| half::bf16::from_bits(b).to_f32())
                    .collect(),
                _ => v
                    .into_iter()
                    .map(|b| half::f16::from_bits(b).to_f32())
                    .collect(),
            },
            HostBuf::U32(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostBuf::F32(v) => v.len(),
            HostBuf::U16(v) => v.len(),
            HostBuf::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An element-wise activation `y = f(x)`. The formulas are on the `Activation` layer
/// (`layers/activation.rs`).
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

/// Where random draws come from: the consumer's stream key and the device step counter
/// (see [`crate::rng`]).
#[derive(Clone, Copy, Debug)]
pub struct RandomKey<'a> {
    pub stream: u64,
    pub step: &'a Indices,
    pub purpose: u32,
}

/// One parameter in an optimizer update.
pub struct ParamUpdate<'a> {
    pub value: &'a mut Tensor,
    /// Read, then set to zero.
    pub grad: &'a mut Tensor,
    /// [`UpdateRule::slots`] tensors of the value's shape.
    pub state: &'a mut [Tensor],
    /// Multiplies the learning rate for this parameter (parameter groups).
    pub lr_scale: f32,
    pub weight_decay: f32,
}

/// The device scalars an update reads.
pub struct UpdateScalars<'a> {
    /// The learning rate: `lr[min(step - 1, len - 1)]`, so a one-element tensor that the host
    /// writes before each step, or a whole schedule uploaded once (what a recorded graph
    /// needs: it cannot take a new value from the host).
    pub lr: &'a Tensor,
    /// `[1]`: the step count, already counting this update (1 on the first).
    pub step: &'a Indices,
    /// `[1]`: multiplies every gradient (the clipping coefficient), if given.
    pub grad_scale: Option<&'a Tensor>,
}

/// A recorded sequence of operations ([`Backend::begin_capture`]) that can be run again: the
/// same kernels on the same buffers, reading whatever those buffers hold at replay time (the
/// next batch, the step counter, the learning rate).
pub trait Graph: Send {
    fn replay(&self) -> Result<()>;
}

/// The numeric operations of one device. See the module doc.
///
/// Conventions: image tensors are `[N, C, H, W]`; "channel" tensors are `[N, C, inner]` where
/// `inner` is the product of the trailing dimensions (1 for `[N, C]`); functions whose name ends
/// in `_backward` accumulate (`+=`) into parameter gradients and return the input gradient.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn device(&self) -> Device;

    // ---- memory
    /// A tensor from the pool; its values are unspecified until written.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Tensor;
    fn zeros(&self, shape: &[usize], dtype: DType) -> Tensor;
    /// A tensor holding host data (the length matches the shape; the variant fits `dtype`).
    fn upload(&self, shape: &[usize], dtype: DType, data: HostBuf) -> Tensor;
    /// Overwrite a tensor with host data of its size (a host-to-device write, not a read).
    fn write(&self, t: &mut Tensor, data: HostBuf);
    /// Copy a tensor's values to the host: a host read ([`strict::note_host_read`]).
    fn download(&self, t: &Tensor) -> HostBuf;
    fn fill(&self, t: &mut Tensor, value: f32);
    /// `dst = src` (same element count and type).
    fn copy(&self, src: &Tensor, dst: &mut Tensor);
    /// Convert between floating-point types (round to nearest even).
    fn cast(&self, x: &Tensor, dtype: DType) -> Tensor;
    /// Wait until every queued operation has finished.
    fn synchronize(&self) {}
    /// Allocation counters of this device's pool.
    fn pool_stats(&self) -> PoolStats;
    /// Start recording the operations this thread queues into a replayable graph (a CUDA
    /// graph) instead of running them. Devices that cannot record say so with an error.
    fn begin_capture(&self) -> Result<()> {
        Err(crate::Error::Device {
            device: self.device().to_string(),
            reason: "this device does not record graphs".into(),
        })
    }
    /// Stop recording and return the graph; an error when the recording failed (then the
    /// operations since `begin_capture` did not run and must be run again).
    fn end_capture(&self) -> Result<Box<dyn Graph>> {
        Err(crate::Error::Device {
            device: self.device().to_string(),
            reason: "this device does not record graphs".into(),
        })
    }

    // ---- linear algebra and element-wise arithmetic
    /// `c = op(a) op(b)` (or `c += ...` when `accumulate`), `op` transposing when asked.
    /// `a`, `b`, `c` are 2-D; `a` and `b` may be `bf16`/`f16`, `c` is `f32`.
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
    /// `y = relu(y + bias[c])` in place for `y` of shape `[N, C, inner]` (without a bias:
    /// `relu(y)`), NaN propagating as in [`Unary::Relu`]: a layer with a bias followed by a
    /// ReLU, in one pass where the backend can.
    fn bias_relu(&self, y: &mut Tensor, bias: Option<&Tensor>, channels: usize) {
        unfused::bias_relu(self, y, bias, channels);
    }
    /// [`Backend::bias_relu`] followed by dropout of probability `p` keyed by `key` (the mask
    /// of [`Backend::dropout_forward`] with that key, bit for bit), in place: a linear layer, a
    /// ReLU and a dropout in one pass where the backend can. The mask is not kept: backward
    /// needs only the output (see [`Backend::bias_relu_backward`]).
    fn bias_relu_dropout(
        &self,
        y: &mut Tensor,
        bias: Option<&Tensor>,
        channels: usize,
        p: f32,
        key: RandomKey<'_>,
    ) {
        unfused::bias_relu_dropout(self, y, bias, channels, p, key);
    }
    /// Backward of [`Backend::bias_relu`] (`keep` = 1) or of [`Backend::bias_relu_dropout`]
    /// (`keep` = 1 / (1 - p), the scale of the kept elements) given its output `y`: returns
    /// the gradient of the sum before the ReLU, `dz = dy keep` where `y > 0` (NaN where `y`
    /// is, else 0: where dropout zeroed a positive sum, 0 rather than `dy 0`, which differs
    /// only in the sign of a zero or a non-finite `dy`; where it zeroed a sum of +inf, `y` is
    /// NaN and so is `dz`), and adds its per-channel sums to `dbias` (as
    /// [`Backend::channel_bias_backward`], in the same order; none without `dbias`).
    fn bias_relu_backward(
        &self,
        y: &Tensor,
        dy: &Tensor,
        dbias: Option<&mut Tensor>,
        channels: usize,
        keep: f32,
    ) -> Tensor {
        unfused::bias_relu_backward(self, y, dy, dbias, channels, keep)
    }
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
    /// `x = clamp(x, lo, hi)` (NaN stays NaN).
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
    /// Swish with a learned scalar beta (`beta` has one element, read on the device).
    fn swish_forward(&self, x: &Tensor, beta: &Tensor) -> Tensor;
    fn swish_backward(&self, x: &Tensor, beta: &Tensor, dy: &Tensor, dbeta: &mut Tensor) -> Tensor;
    /// Softmax over axis 1 of `[N, C, inner]`.
    fn softmax_forward(&self, x: &Tensor, channels: usize) -> Tensor;
    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, channels: usize) -> Tensor;

    // ---- convolution and pooling (`[N, C, H, W]`)
    /// `w`: `[OC, C, KH, KW]`; `b`: `[OC]`. `x` and `w` may be `bf16`/`f16` (of one type);
    /// the output is `f32`.
    fn conv2d_forward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: Window) -> Tensor;
    /// Returns `dx` (`f32`), or an empty tensor when `input_grad` is false.
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
    /// Max pooling; padding acts as -inf; NaN propagates. Returns the output and, per output
    /// element, the position (`h * W + w`) of the maximum within its input plane.
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
    /// Fractional max pooling (Graham 2014) with PyTorch's interval rule: `samples` `[N C, 2]`
    /// holds, per plane, two numbers in [0, 1): `[u_w, u_h]`.
    fn fractional_max_pool2d_forward(
        &self,
        x: &Tensor,
        kernel: (usize, usize),
        out: (usize, usize),
        samples: &Tensor,
    ) -> (Tensor, Indices);
    /// Maxout over groups: `x` is `[N, F * k]`, `y[n, j] = max_{i<k} x[n, j k + i]`.
    fn max_groups_forward(&self, x: &Tensor, k: usize) -> (Tensor, Indices);

    // ---- normalization and noise
    // Every batch-norm operation takes `x` in f32 or in bf16 (bf16 activations), computes in
    // f32 from its values, and returns `y` in x's type; input gradients are f32.

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
    /// Batch norm with batch statistics followed by a ReLU: `(relu(bn(x)), mean, invstd)`, the
    /// running averages updated as [`Backend::batch_norm_forward_train`] does. A backend may
    /// do both in the same passes over memory; by default they are the two operations.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor) {
        let (z, mean, invstd) =
            self.batch_norm_forward_train(x, gamma, beta, running_mean, running_var, momentum, eps);
        let y = self.unary_forward(Unary::Relu, &z.to_dtype(DType::F32));
        (y.to_dtype(x.dtype()), mean, invstd)
    }
    /// Backward of [`Backend::batch_norm_relu_forward_train`] (batch statistics), given its
    /// output `y` and the gradient `dy` of that output. `beta` is the forward's: a backend may
    /// recompute where the ReLU passed from `x` and the statistics instead of reading `y`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        // relu(z) > 0 exactly where z > 0, and is NaN where z is: y stands in for z.
        let _ = beta;
        let y = &y.to_dtype(DType::F32);
        let dz = self.unary_backward(Unary::Relu, y, y, dy);
        self.batch_norm_backward(x, &dz, gamma, mean, invstd, true, dgamma, dbeta)
    }
    /// Batch norm with batch statistics, a ReLU, then a 2x2 max pool of stride 2 over the last
    /// two axes of a `[N, C, H, W]` input: `(maxpool(relu(bn(x))), mean, invstd)`, the running
    /// averages updated as [`Backend::batch_norm_forward_train`] does, in the backend's own
    /// passes (the ReLU's output is never stored, nor the pool's arg-max positions). `None`
    /// (the default): this backend does not fuse them, nothing was done, and the caller runs
    /// the layers one by one.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_pool_forward_train(
        &self,
        _x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        _running_mean: &mut Tensor,
        _running_var: &mut Tensor,
        _momentum: f32,
        _eps: f32,
    ) -> Option<(Tensor, Tensor, Tensor)> {
        None
    }
    /// Backward of [`Backend::batch_norm_relu_pool_forward_train`], given the gradient `dy` of
    /// the pool's output and the forward's `beta`: the ReLU's mask and the pool's arg-max are
    /// found again from `x` and the statistics. Called only after that forward returned
    /// `Some`, so a backend that does not fuse never gets here.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_pool_backward(
        &self,
        _x: &Tensor,
        _dy: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        _mean: &Tensor,
        _invstd: &Tensor,
        _dgamma: &mut Tensor,
        _dbeta: &mut Tensor,
    ) -> Tensor {
        panic!(
            "batch_norm_relu_pool_backward on a backend whose forward does not fuse \
             (batch_norm_relu_pool_forward_train returned None)"
        )
    }
    /// Inverted dropout: `mask[i] = (u_i >= p) / (1 - p)` with `u_i` the Philox uniform of
    /// element `i` under `key`; returns `(x * mask, mask)`, `x * mask` in bf16 for a bf16 x
    /// (bf16 activations: computed in f32 and rounded once) and in f32 otherwise, the mask in
    /// f32.
    fn dropout_forward(&self, x: &Tensor, p: f32, key: RandomKey<'_>) -> (Tensor, Tensor);
    /// `u_i` (Philox uniforms in `[0, 1)`, element `i` under `key`) of a new tensor.
    fn uniform(&self, shape: &[usize], key: RandomKey<'_>) -> Tensor;
    /// `(u_i >= p) as f32`: a keep mask (Bernoulli with keep probability `1 - p`).
    fn bernoulli_keep(&self, shape: &[usize], p: f32, key: RandomKey<'_>) -> Tensor;

    // ---- data on the device
    /// Gather a batch `out` `[B, C, H, W]` (and its labels) from `images` `[N, C, H, W]`:
    /// sample `i` is image `order[cursor[0] + i]`, shifted by a random crop of the zero-padded
    /// image (offsets `dy, dx` in `[-pad, pad]`) then flipped horizontally with probability
    /// `flip_p`, as the CPU pipeline `crop=pad,flip=p` does. The draws of sample `i` are the
    /// Philox uniforms `(key.stream, step, key.purpose, 4 i + k)`, `k` = 0 (dy), 1 (dx),
    /// 2 (flip). Everything is read on the device, so a recorded step gathers the next batch
    /// when the host has written the next cursor.
    #[allow(clippy::too_many_arguments)]
    fn gather_augment(
        &self,
        images: &Tensor,
        labels: &Indices,
        order: &Indices,
        cursor: &Indices,
        out: &mut Tensor,
        labels_out: &mut Indices,
        pad: usize,
        flip_p: f32,
        key: RandomKey<'_>,
    );

    /// `out` `[B, K]`: row `i` is the one-hot vector of `labels[i]` (soft labels to mix).
    fn one_hot(&self, labels: &Indices, out: &mut Tensor);
    /// One per-image augmentation (crop, flip, scale, rotate, translate, noise, Cutout: not
    /// Mixup or CutMix) of every sample of a batch `x` `[B, C, H, W]`, in place: sample `i` is
    /// transformed by [`apply_one`](crate::data::augment::apply_one) with the numbers of the
    /// sequential Philox stream `(device_sample_stream(key.stream, i), step, key.purpose)`
    /// ([`device_sample_stream`](crate::data::augment::device_sample_stream)).
    fn augment_samples(&self, x: &mut Tensor, a: crate::data::Augment, key: RandomKey<'_>);
    /// Mixup (`cutmix` false) or CutMix of a batch `x` `[B, C, H, W]` and its soft labels
    /// `soft` `[B, K]` in place, sample `i` with sample `B - 1 - i`. The draws are
    /// [`device_mix_draws`](crate::data::augment::device_mix_draws) of the sequential Philox
    /// stream of `key`: Mixup sets `x_i = l x_i + (1 - l) x_j`, CutMix pastes the box of `x_j`
    /// into `x_i`; then `y_i = l y_i + (1 - l) y_j` with `l` the label weight (products
    /// rounded before the sum, no fused multiply-add, so every device gives the same bits for
    /// the same `l`).
    fn mix_batch(
        &self,
        x: &mut Tensor,
        soft: &mut Tensor,
        alpha: f32,
        cutmix: bool,
        key: RandomKey<'_>,
    );

    // ---- optimizers
    /// If `loss[0]` is not finite and `first[0]` is 0, `first[0] = step[0] + 1`: the first
    /// step (1-based) with a non-finite loss, noted on the device without a host read.
    fn note_nonfinite(&self, loss: &Tensor, step: &Indices, first: &mut Indices);
    /// `counter += by` (the step counter, a batch cursor: on the device).
    fn increment(&self, counter: &mut Indices, by: u32);
    /// The global gradient norm `sqrt(sum_t sum x_t^2)` over several tensors and the clipping
    /// coefficient `min(1, max_norm / (norm + 1e-6))` (PyTorch's `clip_grad_norm_`), both
    /// one-element tensors on the device.
    fn clip_coefficient(&self, grads: &[&Tensor], max_norm: f32) -> (Tensor, Tensor);
    /// One update of every parameter with `rule`, in one pass (see [`UpdateRule`]); each
    /// gradient is zeroed after use.
    fn optim_update(
        &self,
        rule: &UpdateRule,
        scalars: &UpdateScalars<'_>,
        params: &mut [ParamUpdate<'_>],
    );

    // ---- losses and metrics
    /// Mean softmax cross-entropy over the rows of `logits` `[N, C]`, with label smoothing
    /// `eps` (target `(1 - eps) t + eps / C`). Returns the loss (one element) and
    /// `d loss / d logits` multiplied by `grad_scale`. Hard labels are valid (checked by the
    /// caller through [`Indices::bound`]).
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
    /// Whether every element is finite (one element, 1 or 0, on the device).
    fn all_finite(&self, x: &Tensor) -> Tensor;
}

/// The fused bias + ReLU (+ dropout) operations as their separate operations: `Backend`'s
/// default methods, and a backend's way for the layouts its fused kernels do not take.
pub(crate) mod unfused {
    use super::{Backend, RandomKey, Unary};
    use crate::tensor::{DType, Tensor};

    pub(crate) fn bias_relu<B: Backend + ?Sized>(
        be: &B,
        y: &mut Tensor,
        bias: Option<&Tensor>,
        channels: usize,
    ) {
        if let Some(b) = bias {
            be.add_channel_bias(y, b, channels);
        }
        *y = be.unary_forward(Unary::Relu, y);
    }

    pub(crate) fn bias_relu_dropout<B: Backend + ?Sized>(
        be: &B,
        y: &mut Tensor,
        bias: Option<&Tensor>,
        channels: usize,
        p: f32,
        key: RandomKey<'_>,
    ) {
        // (The backend's own one-pass bias + ReLU where it has one.)
        be.bias_relu(y, bias, channels);
        *y = be.dropout_forward(y, p, key).0;
    }

    pub(crate) fn bias_relu_backward<B: Backend + ?Sized>(
        be: &B,
        y: &Tensor,
        dy: &Tensor,
        dbias: Option<&mut Tensor>,
        channels: usize,
        keep: f32,
    ) -> Tensor {
        // relu(z) > 0 exactly where z > 0, and is NaN where z is: y stands in for z (in f32
        // when it is a bf16 activation).
        let y = &y.to_dtype(DType::F32);
        let mut dz = be.unary_backward(Unary::Relu, y, y, dy);
        if keep != 1.0 {
            be.scale(&mut dz, keep);
        }
        if let Some(db) = dbias {
            be.channel_bias_backward(&dz, db, channels);
        }
        dz
    }
}

/// The CUDA backend of GPU `n` (initialized on first use; panics if it cannot be, which
/// [`Device::cuda`] checks first).
pub(crate) fn cuda_backend(n: usize) -> &'static dyn Backend {
    #[cfg(feature = "cuda")]
    {
        match cuda::get(n) {
            Ok(b) => b,
            Err(e) => panic!("GPU cuda:{n} cannot be used: {e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        panic!("GPU cuda:{n} cannot be used: regimen was built without the `cuda` feature")
    }
}

/// How many GPUs this process can use, or why none (no driver, a build without the `cuda`
/// feature).
pub(crate) fn cuda_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        cuda::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::Device {
            device: "cuda".into(),
            reason: "regimen was built without the `cuda` feature".into(),
        })
    }
}

/// Check that GPU `n` can be used and initialize its backend.
pub(crate) fn init_cuda(n: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        cuda::get(n).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::Error::Device {
            device: format!("cuda:{n}"),
            reason: "regimen was built without the `cuda` feature".into(),
        })
    }
}
