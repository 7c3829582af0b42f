//! Adagrad (Duchi et al., 2011): per-parameter learning rates that shrink with the history of
//! squared gradients.
//!
//! ```text
//! g      = grad + wd theta
//! G_t    = G_{t-1} + g^2                       (G_0 = initial_accumulator_value)
//! lr_t   = lr / (1 + (t - 1) lr_decay)
//! theta  = theta - lr_t g / (sqrt(G_t) + eps)
//! ```
//!
//! PyTorch's `torch.optim.Adagrad`. Defaults: `lr_decay = 0`, `eps = 1e-10`,
//! `initial_accumulator_value = 0`. The lecture writes `eta / sqrt(G_t + eps)` (eps inside the
//! root); PyTorch and regimen add eps outside. Either only guards the division. As the lecture
//! warns, `G` only grows, so the steps shrink until learning stalls; RMSprop fixes that.

use super::Optimizer;
use crate::backend::UpdateRule;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adagrad {
    pub lr_decay: f64,
    pub eps: f64,
    pub initial_accumulator_value: f64,
}

impl Default for Adagrad {
    fn default() -> Self {
        Adagrad {
            lr_decay: 0.0,
            eps: 1e-10,
            initial_accumulator_value: 0.0,
        }
    }
}

impl Optimizer for Adagrad {
    fn name(&self) -> &'static str {
        "adagrad"
    }
    fn validate(&self) -> Result<()> {
        if !(self.lr_decay >= 0.0) {
            return Err(Error::config("lr_decay", self.lr_decay, "must be >= 0"));
        }
        if !(self.eps > 0.0) {
            return Err(Error::config("eps", self.eps, "must be > 0"));
        }
        if !(self.initial_accumulator_value >= 0.0) {
            return Err(Error::config(
                "initial_accumulator_value",
                self.initial_accumulator_value,
                "must be >= 0",
            ));
        }
        Ok(())
    }
    fn rule(&self) -> UpdateRule {
        UpdateRule::Adagrad {
            lr_decay: self.lr_decay,
            eps: self.eps,
            initial: self.initial_accumulator_value,
        }
    }
}
