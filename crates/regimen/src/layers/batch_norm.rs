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
use crate::tensor::{DType, Device, Tensor};

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
    /// The output of the last forward when a ReLU was applied in it ([`Layer::forward_relu`]).
    relu_out: Option<Tensor>,
    /// Whether the last forward also applied a ReLU and a 2x2 max pool
    /// ([`Layer::forward_relu_pool`]): backward then takes the pool output's gradient.
    pool_out: bool,
    /// Batch statistics over all data-parallel ranks ([`Layer::sync_batch_norm`]).
    pub sync: bool,
    /// `(share of the global batch, values per channel over all ranks)` of the last
    /// synchronized forward.
    synced: Option<(f32, f64)>,
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
            relu_out: None,
            pool_out: false,
            sync: false,
            synced: None,
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

/// `[N, C, L...]` as (N, C, L).
fn ncl(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

impl BatchNorm {
    /// Training forward with statistics over every rank's batch: per-channel sums, then sums
    /// of squared deviations, each summed over the ranks (two small all-reduces, in f64), then
    /// the usual normalization. Computed on the host.
    /// Forward with batch statistics on this rank's batch, followed by a ReLU with `relu`.
    fn train_forward(&mut self, x: &Tensor, ctx: &Ctx, relu: bool) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let per_channel = x.numel() / self.channels();
        if per_channel < 2 {
            return Err(Error::shape(
                self.describe(),
                "more than one value per channel in training (batch statistics)",
                x.shape(),
            ));
        }
        let be = x.backend();
        let (gamma, beta) = (&self.gamma.value, &self.beta.value);
        let (rm, rv) = (&mut self.running_mean, &mut self.running_var);
        let (y, mean, invstd) = if relu {
            be.batch_norm_relu_forward_train(x, gamma, beta, rm, rv, self.momentum, self.eps)
        } else {
            be.batch_norm_forward_train(x, gamma, beta, rm, rv, self.momentum, self.eps)
        };
        keep(ctx, &mut self.cache, || (x.clone(), mean, invstd, true));
        self.relu_out = None;
        self.pool_out = false;
        if relu {
            keep(ctx, &mut self.relu_out, || y.clone());
        }
        Ok(y)
    }

    fn forward_synced(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        use crate::dist::{host_f32, world, write_f32};
        let comm = world();
        let (n, c, l) = ncl(x.shape());
        let xs = host_f32(x);
        let per_channel = |f: &dyn Fn(usize, &[f32]) -> f64| -> Vec<f64> {
            let mut out = vec![0.0f64; c];
            for i in 0..n {
                for (ch, o) in out.iter_mut().enumerate() {
                    let base = (i * c + ch) * l;
                    *o += f(ch, &xs[base..base + l]);
                }
            }
            out
        };
        let mut sums = per_channel(&|_, v| v.iter().map(|&a| a as f64).sum());
        sums.push((n * l) as f64);
        let sums = comm.sum_f64(sums)?;
        let m = sums[c];
        if m < 2.0 {
            return Err(Error::shape(
                self.describe(),
                "more than one value per channel over all ranks in training (batch statistics)",
                x.shape(),
            ));
        }
        let mean: Vec<f64> = sums[..c].iter().map(|s| s / m).collect();
        let sq = per_channel(&|ch, v| {
            v.iter()
                .map(|&a| (a as f64 - mean[ch]) * (a as f64 - mean[ch]))
                .sum()
        });
        let sq = comm.sum_f64(sq)?;
        let var: Vec<f64> = sq.iter().map(|q| q / m).collect();
        let invstd: Vec<f64> = var
            .iter()
            .map(|v| 1.0 / (v + self.eps as f64).sqrt())
            .collect();
        let (gamma, beta) = (host_f32(&self.gamma.value), host_f32(&self.beta.value));
        let mut y = vec![0.0f32; xs.len()];
        for i in 0..n {
            for ch in 0..c {
                let base = (i * c + ch) * l;
                let (mu, is) = (mean[ch] as f32, invstd[ch] as f32);
                for k in base..base + l {
                    y[k] = gamma[ch] * ((xs[k] - mu) * is) + beta[ch];
                }
            }
        }
        let mom = self.momentum as f64;
        let rm: Vec<f32> = host_f32(&self.running_mean)
            .iter()
            .zip(&mean)
            .map(|(&r, &mu)| ((1.0 - mom) * r as f64 + mom * mu) as f32)
            .collect();
        let rv: Vec<f32> = host_f32(&self.running_var)
            .iter()
            .zip(&var)
            .map(|(&r, &v)| ((1.0 - mom) * r as f64 + mom * v * m / (m - 1.0)) as f32)
            .collect();
        write_f32(&mut self.running_mean, &rm);
        write_f32(&mut self.running_var, &rv);
        let device = x.device();
        let to_t =
            |v: &[f64]| Tensor::from_host(&[c], v.iter().map(|&a| a as f32).collect(), device);
        let (mean_t, invstd_t) = (to_t(&mean)?, to_t(&invstd)?);
        keep(ctx, &mut self.cache, || (x.clone(), mean_t, invstd_t, true));
        self.synced = Some((ctx.share, m));
        Tensor::from_host(x.shape(), y, device)
    }

    /// Backward of [`BatchNorm::forward_synced`]: the per-channel sums of `dy` and
    /// `dy * xhat` are summed over the ranks, each rank's weighed by its share of the global
    /// batch (the loss is the global batch's mean) and the total divided by this rank's share
    /// again (the rest of this rank's backward is in its own, unshared, scale).
    fn backward_synced(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        share: f32,
        m: f64,
    ) -> Result<Tensor> {
        use crate::dist::{host_f32, world, write_f32};
        let (n, c, l) = ncl(x.shape());
        let (xs, dys) = (host_f32(x), host_f32(dy));
        let (mean, invstd, gamma) = (
            host_f32(mean),
            host_f32(invstd),
            host_f32(&self.gamma.value),
        );
        let mut local = vec![0.0f64; 2 * c];
        for i in 0..n {
            for ch in 0..c {
                let base = (i * c + ch) * l;
                for k in base..base + l {
                    let xhat = ((xs[k] - mean[ch]) * invstd[ch]) as f64;
                    local[ch] += dys[k] as f64;
                    local[c + ch] += dys[k] as f64 * xhat;
                }
            }
        }
        let add = |t: &mut Tensor, v: &[f64]| {
            let old = host_f32(t);
            let new: Vec<f32> = old.iter().zip(v).map(|(&a, &b)| a + b as f32).collect();
            write_f32(t, &new);
        };
        add(&mut self.beta.grad, &local[..c]);
        add(&mut self.gamma.grad, &local[c..]);
        let s = share as f64;
        let global = world().sum_f64(local.iter().map(|v| v * s).collect())?;
        let mut dx = vec![0.0f32; xs.len()];
        for i in 0..n {
            for ch in 0..c {
                let base = (i * c + ch) * l;
                let (sd, sdx) = (global[ch] / s, global[c + ch] / s);
                let k0 = gamma[ch] as f64 * invstd[ch] as f64 / m;
                for k in base..base + l {
                    let xhat = ((xs[k] - mean[ch]) * invstd[ch]) as f64;
                    dx[k] = (k0 * (m * dys[k] as f64 - sd - xhat * sdx)) as f32;
                }
            }
        }
        Tensor::from_host(x.shape(), dx, x.device())
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

    /// (bf16 activations: normalized through f32, kept and handed on in bf16.)
    fn takes_half(&self) -> bool {
        true
    }

    fn forward_relu(&mut self, x: &Tensor, ctx: &Ctx) -> Option<Result<Tensor>> {
        if ctx.mode != Mode::Train || self.sync {
            return None;
        }
        Some(self.train_forward(x, ctx, true))
    }

    fn forward_relu_pool(&mut self, x: &Tensor, ctx: &Ctx) -> Option<Result<Tensor>> {
        // Anything unusual (evaluation, synchronized statistics, a shape that batch norm or
        // the pool would refuse) goes the unfused way, which reports it.
        if ctx.mode != Mode::Train || self.sync || self.output_shape(x.shape()).is_err() {
            return None;
        }
        let &[n, _, h, w] = x.shape() else {
            return None;
        };
        if h < 2 || w < 2 || n * h * w < 2 {
            return None;
        }
        let (gamma, beta) = (&self.gamma.value, &self.beta.value);
        let (rm, rv) = (&mut self.running_mean, &mut self.running_var);
        let (y, mean, invstd) = x.backend().batch_norm_relu_pool_forward_train(
            x,
            gamma,
            beta,
            rm,
            rv,
            self.momentum,
            self.eps,
        )?;
        keep(ctx, &mut self.cache, || (x.clone(), mean, invstd, true));
        self.relu_out = None;
        self.pool_out = true;
        Some(Ok(y))
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        self.relu_out = None;
        self.pool_out = false;
        let be = x.backend();
        match ctx.mode {
            // (Statistics over the ranks are computed from f32.)
            Mode::Train if self.sync => self.forward_synced(&x.to_dtype(DType::F32), ctx),
            Mode::Train => self.train_forward(x, ctx, false),
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
        if self.pool_out {
            let s = x.shape();
            check_dy(self, &[s[0], s[1], s[2] / 2, s[3] / 2], dy)?;
            let (be, gamma, beta) = (dy.backend(), &self.gamma.value, &self.beta.value);
            let (dg, db) = (&mut self.gamma.grad, &mut self.beta.grad);
            return Ok(be.batch_norm_relu_pool_backward(x, dy, gamma, beta, mean, invstd, dg, db));
        }
        check_dy(self, x.shape(), dy)?;
        if let (None, true, Some((share, m))) = (&self.relu_out, *batch_stats, self.synced) {
            let (x, mean, invstd) = (x.clone(), mean.clone(), invstd.clone());
            return self.backward_synced(&x, dy, &mean, &invstd, share, m);
        }
        let (be, gamma, beta) = (dy.backend(), &self.gamma.value, &self.beta.value);
        let (dg, db) = (&mut self.gamma.grad, &mut self.beta.grad);
        Ok(match &self.relu_out {
            Some(y) => be.batch_norm_relu_backward(x, y, dy, gamma, beta, mean, invstd, dg, db),
            None => be.batch_norm_backward(x, dy, gamma, mean, invstd, *batch_stats, dg, db),
        })
    }

    fn sync_batch_norm(&mut self, on: bool) {
        self.sync = on;
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
