//! RMSprop (Hinton, 2012): Adagrad with an exponentially decaying average of squared gradients,
//! so old gradients are forgotten and the step size does not vanish.
//!
//! ```text
//! g      = grad + wd theta
//! G_t    = alpha G_{t-1} + (1 - alpha) g^2        (the lecture's gamma is alpha)
//! c_t    = alpha c_{t-1} + (1 - alpha) g          (centered only)
//! d      = sqrt(G_t - c_t^2) + eps   (centered)   or   sqrt(G_t) + eps
//! b_t    = mu b_{t-1} + g / d        (momentum > 0: theta -= lr b_t)
//! theta  = theta - lr g / d          (otherwise)
//! ```
//!
//! PyTorch's `torch.optim.RMSprop`. Defaults: `alpha = 0.99`, `eps = 1e-8`, `momentum = 0`,
//! `centered = false`. The centered form divides by an estimate of the gradient's variance
//! instead of its second moment.

use super::Optimizer;
use crate::backend::UpdateRule;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsProp {
    pub alpha: f64,
    pub eps: f64,
    pub momentum: f64,
    pub centered: bool,
}

impl Default for RmsProp {
    fn default() -> Self {
        RmsProp {
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.0,
            centered: false,
        }
    }
}

impl Optimizer for RmsProp {
    fn name(&self) -> &'static str {
        "rmsprop"
    }
    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.alpha) {
            return Err(Error::config("alpha", self.alpha, "must be in [0, 1)"));
        }
        if !(self.eps > 0.0) {
            return Err(Error::config("eps", self.eps, "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "momentum",
                self.momentum,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
    fn rule(&self) -> UpdateRule {
        UpdateRule::RmsProp {
            alpha: self.alpha,
            eps: self.eps,
            momentum: self.momentum,
            centered: self.centered,
        }
    }
}
