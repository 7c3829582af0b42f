//! Batch normalization (Ioffe & Szegedy, 2015), as in the lecture:
//!
//! ```text
//! mu_B    = 1/m sum_i x_i                        (per channel, over batch and positions)
//! var_B   = 1/m sum_i (x_i - mu_B)^2
//! xhat_i  = (x_i - mu_B) / sqrt(var_B + eps)
//! y_i     = gamma xhat_i + beta
//! ```
//!
//! Training uses the batch statistics and updates running averages
//! `r = (1 - momentum) r + momentum stat` (the variance unbiased, `var_B m / (m - 1)`);
//! evaluation uses the running averages, so the output of a sample no longer depends on the
//! rest of the batch. Defaults: `momentum = 0.1`, `eps = 1e-5`, `gamma = 1`, `beta = 0`
//! (PyTorch's). Parameter names: `weight` (gamma), `bias` (beta), buffers `running_mean`,
//! `running_var`.
//!
//! `BatchNorm::d1(C)` takes `[N, C]` or `[N, C, L]` (PyTorch's `BatchNorm1d`),
//! `BatchNorm::d2(C)` takes `[N, C, H, W]` (`BatchNorm2d`).

use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, join, keep, Ctx, Layer, Mode, Param, ParamKind};
use crate::tensor::{Device, Tensor};

pub struct BatchNorm {
    pub gamma: Param,
    pub beta: Param,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub momentum: f32,
    pub eps: f32,
    ranks: &'static [usize],
    /// `(x, mean, invstd, batch_stats)` of the last forward.
    cache: Option<(Tensor, Tensor, Tensor, bool)>,
}

impl BatchNorm {
    fn make(channels: usize, ranks: &'static [usize]) -> BatchNorm {
        let d = Device::Cpu;
        BatchNorm {
            gamma: Param::new(Tensor::full(&[channels], 1.0, d), ParamKind::Norm),
            beta: Param::new(Tensor::zeros(&[channels], d), ParamKind::Norm),
            running_mean: Tensor::zeros(&[channels], d),
            running_var: Tensor::full(&[channels], 1.0, d),
            momentum: 0.1,
            eps: 1e-5,
            ranks,
            cache: None,
        }
    }

    /// For `[N, C]` features or `[N, C, L]` sequences.
    pub fn d1(channels: usize) -> BatchNorm {
        Self::make(channels, &[2, 3])
    }

    /// For `[N, C, H, W]` images: statistics per channel over batch and positions.
    pub fn d2(channels: usize) -> BatchNorm {
        Self::make(channels, &[4])
    }

    pub fn momentum(mut self, momentum: f32) -> BatchNorm {
        self.momentum = momentum;
        self
    }

    pub fn eps(mut self, eps: f32) -> BatchNorm {
        self.eps = eps;
        self
    }

    pub fn channels(&self) -> usize {
        self.gamma.value.numel()
    }
}

impl Layer for BatchNorm {
    fn describe(&self) -> String {
        format!(
            "BatchNorm{}d({})",
            if self.ranks == [4] { 2 } else { 1 },
            self.channels()
        )
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if !self.ranks.contains(&input.len()) || input[1] != self.channels() {
            let want = if self.ranks == [4] {
                format!("[N, {}, H, W]", self.channels())
            } else {
                format!("[N, {}] or [N, {}, L]", self.channels(), self.channels())
            };
            return Err(Error::shape(self.describe(), want, input));
        }
        Ok(input.to_vec())
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let be = x.backend();
        match ctx.mode {
            Mode::Train => {
                let per_channel = x.numel() / self.channels();
                if per_channel < 2 {
                    return Err(Error::shape(
                        self.describe(),
                        "more than one value per channel in training (batch statistics)",
                        x.shape(),
                    ));
                }
                let (y, mean, invstd) = be.batch_norm_forward_train(
                    x,
                    &self.gamma.value,
                    &self.beta.value,
                    &mut self.running_mean,
                    &mut self.running_var,
                    self.momentum,
                    self.eps,
                );
                keep(ctx, &mut self.cache, || (x.clone(), mean, invstd, true));
                Ok(y)
            }
            Mode::Eval => {
                let y = be.batch_norm_forward_eval(
                    x,
                    &self.gamma.value,
                    &self.beta.value,
                    &self.running_mean,
                    &self.running_var,
                    self.eps,
                );
                let (mean, var, eps) = (&self.running_mean, &self.running_var, self.eps);
                keep(ctx, &mut self.cache, || {
                    (x.clone(), mean.clone(), be.invstd(var, eps), false)
                });
                Ok(y)
            }
        }
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (x, mean, invstd, batch_stats) = cached(&self.cache, self)?;
        check_dy(self, x.shape(), dy)?;
        Ok(dy.backend().batch_norm_backward(
            x,
            dy,
            &self.gamma.value,
            mean,
            invstd,
            *batch_stats,
            &mut self.gamma.grad,
            &mut self.beta.grad,
        ))
    }

    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        f(&join(prefix, "weight"), &mut self.gamma);
        f(&join(prefix, "bias"), &mut self.beta);
    }

    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.gamma);
        f(&mut self.beta);
    }

    fn visit_buffers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&join(prefix, "running_mean"), &mut self.running_mean);
        f(&join(prefix, "running_var"), &mut self.running_var);
    }

    fn flops(&self, input: &[usize]) -> u64 {
        2 * input.iter().skip(1).product::<usize>() as u64
    }
}
