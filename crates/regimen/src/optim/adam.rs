//! Adam (Kingma & Ba, 2015) — momentum plus RMSprop with bias correction — and AdamW
//! (Loshchilov & Hutter, 2019), Adam with decoupled weight decay.
//!
//! ```text
//! g      = grad + wd theta                 (Adam; AdamW instead does theta *= 1 - lr wd first)
//! m_t    = beta1 m_{t-1} + (1 - beta1) g
//! v_t    = beta2 v_{t-1} + (1 - beta2) g^2
//! vmax_t = max(vmax_{t-1}, v_t)            (AMSGrad: use vmax_t for v_t below)
//! m^     = m_t / (1 - beta1^t)       v^ = v_t / (1 - beta2^t)
//! theta  = theta - lr m^ / (sqrt(v^) + eps)
//! ```
//!
//! The bias correction compensates for `m` and `v` starting at zero ("the initial momentum
//! biased towards zero", the lecture). PyTorch's `torch.optim.Adam` / `AdamW`, computed in the
//! same order (`step_size = lr / (1 - beta1^t)`, `denom = sqrt(v) / sqrt(1 - beta2^t) + eps`).
//! Defaults: `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`, `amsgrad = false`.
//!
//! L2 in the loss versus decoupled decay: with Adam, `wd theta` added to the gradient is divided
//! by `sqrt(v^)` like the rest of the gradient, so weights with large gradients are barely
//! decayed; AdamW shrinks every weight by the same factor `1 - lr wd` whatever its gradient
//! history. With plain SGD the two are the same thing. See `tests/optim.rs`.

use super::Optimizer;
use crate::backend::UpdateRule;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub amsgrad: bool,
    /// AdamW: weight decay shrinks the weights directly instead of joining the gradient.
    pub decoupled: bool,
}

impl Default for Adam {
    fn default() -> Self {
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            amsgrad: false,
            decoupled: false,
        }
    }
}

impl Adam {
    /// AdamW with the default betas.
    pub fn adamw() -> Adam {
        Adam {
            decoupled: true,
            ..Default::default()
        }
    }
}

impl Optimizer for Adam {
    fn name(&self) -> &'static str {
        if self.decoupled {
            "adamw"
        } else {
            "adam"
        }
    }
    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(Error::config("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(Error::config("beta2", self.beta2, "must be in [0, 1)"));
        }
        if !(self.eps > 0.0) {
            return Err(Error::config("eps", self.eps, "must be > 0"));
        }
        Ok(())
    }
    fn rule(&self) -> UpdateRule {
        UpdateRule::Adam {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            amsgrad: self.amsgrad,
            decoupled: self.decoupled,
        }
    }
}
