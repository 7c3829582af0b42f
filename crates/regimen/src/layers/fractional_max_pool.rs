//! Fractional max pooling (Graham, "Fractional Max-Pooling", 2014).
//!
//! Reduces `H x W` to `OH x OW` with a non-integer ratio (e.g. `1/sqrt(2)`): the pooling
//! windows (`k x k`, overlapping) start at the pseudo-random increasing sequence
//! `a_i = floor((i + u) alpha) - floor(u alpha)`, `alpha = (H - k) / (OH - 1)`, the last window
//! flush with the border, with one `u ~ U[0, 1)` per plane and axis. This is PyTorch's
//! `nn.FractionalMaxPool2d` exactly, so given the same `u`s both give the same output.
//!
//! In training a fresh `u` is drawn per plane at every step (the regularizing randomness):
//! element `2 p` (`u_w`) and `2 p + 1` (`u_h`) of plane `p` are the Philox uniforms of
//! `(stream, step, FRACTIONAL_POOL, index)` ([`crate::rng`]), drawn on the device.
//! In evaluation regimen uses the fixed `u = 0.5` for every plane, so the eval function is
//! deterministic (PyTorch keeps drawing; Graham averages several draws at test time — run the
//! model several times in training mode and average to get that).

use crate::backend::RandomKey;
use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, keep, Ctx, Layer, Mode};
use crate::rng::purpose;
use crate::tensor::{Indices, Tensor};

pub struct FractionalMaxPool2d {
    kernel: usize,
    size: Target,
    stream: u64,
    /// Fixed samples (tests, or reproducing PyTorch): `[u_w, u_h]` per plane.
    samples: Option<Vec<f32>>,
    cache: Option<(Vec<usize>, Vec<usize>, Indices)>,
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Size(usize, usize),
    Ratio(f32),
}

impl FractionalMaxPool2d {
    /// Pool `k x k` windows down to a fixed output size.
    pub fn with_output_size(kernel: usize, out_h: usize, out_w: usize) -> Self {
        Self::make(kernel, Target::Size(out_h, out_w))
    }

    /// Pool `k x k` windows down to `floor(ratio * H) x floor(ratio * W)`, `0 < ratio < 1`
    /// (Graham's favourite is `1/sqrt(2)` with `k = 2`).
    pub fn with_ratio(kernel: usize, ratio: f32) -> Self {
        Self::make(kernel, Target::Ratio(ratio))
    }

    fn make(kernel: usize, size: Target) -> Self {
        FractionalMaxPool2d {
            kernel,
            size,
            stream: 0,
            samples: None,
            cache: None,
        }
    }

    /// Use these `[u_w, u_h]` per plane instead of random draws (for tests and for reproducing
    /// PyTorch's `_random_samples`).
    pub fn set_samples(&mut self, samples: Vec<f32>) {
        self.samples = Some(samples);
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        match self.size {
            Target::Size(a, b) => (a, b),
            Target::Ratio(r) => ((h as f32 * r) as usize, (w as f32 * r) as usize),
        }
    }
}

impl Layer for FractionalMaxPool2d {
    fn describe(&self) -> String {
        match self.size {
            Target::Size(a, b) => format!("FractionalMaxPool2d(k{}, out {a}x{b})", self.kernel),
            Target::Ratio(r) => format!("FractionalMaxPool2d(k{}, ratio {r})", self.kernel),
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 4 {
            return Err(Error::shape(self.describe(), "[N, C, H, W]", input));
        }
        let (oh, ow) = self.out_hw(input[2], input[3]);
        // PyTorch: out + k - 1 <= in, and out >= 1.
        if self.kernel == 0
            || oh == 0
            || ow == 0
            || oh + self.kernel - 1 > input[2]
            || ow + self.kernel - 1 > input[3]
        {
            return Err(Error::shape(
                self.describe(),
                format!(
                    "[N, C, H, W] with H >= {} and W >= {} (output + kernel - 1)",
                    oh + self.kernel - 1,
                    ow + self.kernel - 1
                ),
                input,
            ));
        }
        Ok(vec![input[0], input[1], oh, ow])
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let out = self.output_shape(x.shape())?;
        let planes = out[0] * out[1];
        let samples = match (&self.samples, ctx.mode) {
            (Some(s), _) => {
                if s.len() != 2 * planes {
                    return Err(Error::shape(
                        self.describe(),
                        format!("{} fixed samples (2 per plane)", 2 * planes),
                        &[s.len()],
                    ));
                }
                Tensor::from_host(&[planes, 2], s.clone(), x.device())?
            }
            (None, Mode::Eval) => Tensor::full(&[planes, 2], 0.5, x.device()),
            (None, Mode::Train) => {
                let step = ctx.step_on(x.device());
                let key = RandomKey {
                    stream: ctx.stream(self.stream),
                    step: &step,
                    purpose: purpose::FRACTIONAL_POOL,
                };
                x.backend().uniform(&[planes, 2], key)
            }
        };
        let (y, idx) = x.backend().fractional_max_pool2d_forward(
            x,
            (self.kernel, self.kernel),
            (out[2], out[3]),
            &samples,
        );
        keep(ctx, &mut self.cache, || (x.shape().to_vec(), out, idx));
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (xs, ys, idx) = cached(&self.cache, self)?;
        check_dy(self, ys, dy)?;
        Ok(dy
            .backend()
            .max_backward(dy, idx, xs, ys[2] * ys[3], xs[2] * xs[3]))
    }

    fn reseed(&mut self, seed: u64) {
        self.stream = seed;
    }

    fn flops(&self, input: &[usize]) -> u64 {
        self.output_shape(input)
            .map(|o| (o[1] * o[2] * o[3] * self.kernel * self.kernel) as u64)
            .unwrap_or(0)
    }
}
