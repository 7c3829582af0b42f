//! Finite-difference gradient checking, for regimen's layers and for yours.
//!
//! A layer's backward is checked against central differences of the scalar
//! `L(x, θ) = sum_i r_i f(x, θ)_i` for a fixed random projection `r` of the output: then
//! `backward(r)` must return `dL/dx` and accumulate `dL/dθ`, and each checked element must
//! satisfy `|analytic - numeric| <= atol + rtol max(|analytic|, |numeric|)` with
//! `numeric = (L(v + h) - L(v - h)) / 2h`.
//!
//! The engine computes in f32, so `L` is summed in f64 and the step `h` is large enough
//! (1e-2 by default) that f32 rounding in the forward pass (~1e-7 relative) stays two orders
//! below the tolerance while the truncation error of the central difference (`h^2 f''' / 6`)
//! stays below it too. Inputs near a kink (ReLU at 0, ties in a max) must be avoided by the
//! caller, as with any finite-difference check.
//!
//! Before every forward the layer is [`Layer::reseed`]ed with the same seed, so dropout masks,
//! stochastic depth and fractional pooling regions are the same in every evaluation.

use crate::error::Result;
use crate::layer::{zero_grads, Ctx, Layer, Mode};
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct GradCheck {
    /// Half-width of the central difference.
    pub step: f32,
    pub atol: f64,
    pub rtol: f64,
    /// At most this many elements of each tensor are checked (chosen at random beyond it).
    pub max_elements: usize,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            step: 1e-2,
            atol: 5e-4,
            rtol: 5e-3,
            max_elements: 256,
            seed: 0,
        }
    }
}

/// The comparison for one tensor (the input `x`, or a parameter by name).
#[derive(Clone, Debug)]
pub struct TensorCheck {
    pub name: String,
    pub checked: usize,
    pub failures: usize,
    /// The element with the largest error relative to the tolerance: (index, analytic, numeric).
    pub worst: (usize, f64, f64),
    pub max_abs_err: f64,
}

#[derive(Clone, Debug)]
pub struct GradCheckReport {
    pub tensors: Vec<TensorCheck>,
}

impl GradCheckReport {
    pub fn passed(&self) -> bool {
        self.tensors
            .iter()
            .all(|t| t.failures == 0 && t.checked > 0)
    }
}

impl std::fmt::Display for GradCheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for t in &self.tensors {
            let (i, a, n) = t.worst;
            writeln!(
                f,
                "{:<20} {:>4} checked, {:>3} failed, max |err| {:.2e} (worst [{i}]: analytic {a:.6e}, numeric {n:.6e})",
                t.name, t.checked, t.failures, t.max_abs_err
            )?;
        }
        Ok(())
    }
}

impl GradCheck {
    fn within(&self, a: f64, n: f64) -> bool {
        (a - n).abs() <= self.atol + self.rtol * a.abs().max(n.abs())
    }

    fn pick(&self, len: usize, rng: &mut Rng) -> Vec<usize> {
        if len <= self.max_elements {
            (0..len).collect()
        } else {
            let mut all: Vec<usize> = (0..len).collect();
            rng.shuffle(&mut all);
            all.truncate(self.max_elements);
            all.sort_unstable();
            all
        }
    }

    /// Compare analytic and numeric derivatives of a scalar function `f` of one vector,
    /// perturbing the elements `idx` of `v`.
    fn compare(
        &self,
        name: &str,
        v: &[f32],
        analytic: &[f32],
        idx: &[usize],
        mut f: impl FnMut(&[f32]) -> Result<f64>,
    ) -> Result<TensorCheck> {
        let mut check = TensorCheck {
            name: name.to_string(),
            checked: 0,
            failures: 0,
            worst: (0, 0.0, 0.0),
            max_abs_err: 0.0,
        };
        let mut worst_ratio = -1.0;
        let mut w = v.to_vec();
        for &i in idx {
            let orig = v[i];
            w[i] = orig + self.step;
            let up = w[i];
            let fp = f(&w)?;
            w[i] = orig - self.step;
            let down = w[i];
            let fm = f(&w)?;
            w[i] = orig;
            let numeric = (fp - fm) / (up as f64 - down as f64);
            let a = analytic[i] as f64;
            let err = (a - numeric).abs();
            let ratio = err / (self.atol + self.rtol * a.abs().max(numeric.abs()));
            check.checked += 1;
            check.max_abs_err = check.max_abs_err.max(err);
            if !self.within(a, numeric) {
                check.failures += 1;
            }
            if ratio > worst_ratio {
                worst_ratio = ratio;
                check.worst = (i, a, numeric);
            }
        }
        Ok(check)
    }

    /// Check `backward` of `layer` at input `x` in `mode`, for `x` and every parameter.
    pub fn layer(&self, layer: &mut dyn Layer, x: &Tensor, mode: Mode) -> Result<GradCheckReport> {
        let mut rng = Rng::new(self.seed ^ 0x5EED);
        let out_shape = layer.output_shape(x.shape())?;
        let r: Vec<f32> = (0..out_shape.iter().product::<usize>())
            .map(|_| rng.normal() as f32)
            .collect();
        let r_t = Tensor::from_host(&out_shape, r.clone(), x.device())?;
        let seed = self.seed;
        let ctx = Ctx::new(mode);
        let project = |y: &Tensor| -> f64 {
            y.to_vec()
                .iter()
                .zip(&r)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };

        // Analytic gradients (of the input too, whatever a training loop left set).
        layer.set_input_grad(true);
        zero_grads(layer);
        layer.reseed(seed);
        layer.forward(x, &ctx)?;
        let dx = layer.backward(&r_t)?.to_vec();
        let mut params: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::new();
        layer.visit_params("", &mut |name, p| {
            params.push((name.to_string(), p.value.to_vec(), p.grad.to_vec()))
        });

        let mut tensors = Vec::new();
        let xv = x.to_vec();
        let idx = self.pick(xv.len(), &mut rng);
        tensors.push(self.compare("input", &xv, &dx, &idx, |w| {
            let xt = Tensor::from_host(x.shape(), w.to_vec(), x.device())?;
            layer.reseed(seed);
            Ok(project(&layer.forward(&xt, &ctx)?))
        })?);

        for (name, value, grad) in &params {
            let idx = self.pick(value.len(), &mut rng);
            let check = self.compare(name, value, grad, &idx, |w| {
                set_param(layer, name, w)?;
                layer.reseed(seed);
                Ok(project(&layer.forward(x, &ctx)?))
            })?;
            set_param(layer, name, value)?;
            tensors.push(check);
        }
        Ok(GradCheckReport { tensors })
    }

    /// Check the gradient of a scalar function of one tensor: `f(v)` returns the value and
    /// the analytic gradient (for losses and penalties).
    pub fn function(
        &self,
        name: &str,
        v: &Tensor,
        mut f: impl FnMut(&Tensor) -> Result<(f64, Tensor)>,
    ) -> Result<GradCheckReport> {
        let mut rng = Rng::new(self.seed ^ 0xF00D);
        let (_, grad) = f(v)?;
        let values = v.to_vec();
        let idx = self.pick(values.len(), &mut rng);
        let check = self.compare(name, &values, &grad.to_vec(), &idx, |w| {
            let t = Tensor::from_host(v.shape(), w.to_vec(), v.device())?;
            Ok(f(&t)?.0)
        })?;
        Ok(GradCheckReport {
            tensors: vec![check],
        })
    }
}

fn set_param(layer: &mut dyn Layer, name: &str, values: &[f32]) -> Result<()> {
    let mut result = Ok(());
    layer.visit_params("", &mut |n, p| {
        if n == name {
            match Tensor::from_host(p.value.shape(), values.to_vec(), p.value.device()) {
                Ok(t) => p.value = t,
                Err(e) => result = Err(e),
            }
        }
    });
    result
}
