//! Stochastic gradient descent, with optional momentum and Nesterov momentum.
//!
//! Batch, mini-batch and stochastic gradient descent are the same update with different batch
//! sizes (the whole dataset, `n` samples, one sample):
//!
//! ```text
//! g     = grad + wd theta                      (L2 weight decay, if any)
//! v_t   = mu v_{t-1} + (1 - dampening) g       (v_1 = g)
//! step  = g + mu v_t    (Nesterov)   or   v_t  (momentum)   or   g  (plain)
//! theta = theta - lr step
//! ```
//!
//! PyTorch's `torch.optim.SGD`, exactly. Defaults: `momentum = 0`, `dampening = 0`,
//! `nesterov = false`.
//!
//! **Momentum, the lecture's form.** The lecture writes `v_t = gamma v_{t-1} + eta grad`,
//! `theta_t = theta_{t-1} - v_t`. With a constant learning rate this is the same trajectory:
//! the lecture's `v` is `lr` times ours.
//!
//! **Nesterov, the lecture's form and ours.** The lecture evaluates the gradient at the
//! look-ahead point: `v_t = gamma v_{t-1} + eta grad(theta_{t-1} - gamma v_{t-1})`,
//! `theta_t = theta_{t-1} - v_t`. Change variables to the look-ahead point
//! `phi_t = theta_t - gamma v_t`. Then
//! `phi_t = theta_{t-1} - v_t - gamma v_t = phi_{t-1} + gamma v_{t-1} - (1 + gamma) v_t`, and
//! substituting `v_t` gives `phi_t = phi_{t-1} - gamma^2 v_{t-1} - (1 + gamma) eta grad(phi_{t-1})`
//! = `phi_{t-1} - eta (grad(phi_{t-1}) + gamma u_t)` with `u_t = gamma u_{t-1} + grad(phi_{t-1})`
//! (`u = v / eta`). That is the update above with `mu = gamma`: it needs only the gradient at
//! the current parameters, which are the lecture's look-ahead point. The test
//! `nesterov_equals_the_lecture_lookahead_form` checks both trajectories on a quadratic.

use super::Optimizer;
use crate::backend::UpdateRule;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

impl Sgd {
    pub fn momentum(momentum: f64) -> Sgd {
        Sgd {
            momentum,
            ..Default::default()
        }
    }
    pub fn nesterov(momentum: f64) -> Sgd {
        Sgd {
            momentum,
            nesterov: true,
            ..Default::default()
        }
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        if self.nesterov {
            "sgd-nesterov"
        } else if self.momentum != 0.0 {
            "sgd-momentum"
        } else {
            "sgd"
        }
    }
    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "momentum",
                self.momentum,
                "must be in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&self.dampening) {
            return Err(Error::config(
                "dampening",
                self.dampening,
                "must be in [0, 1]",
            ));
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return Err(Error::config(
                "nesterov",
                true,
                "Nesterov momentum needs momentum > 0 and dampening = 0",
            ));
        }
        Ok(())
    }
    fn rule(&self) -> UpdateRule {
        UpdateRule::Sgd {
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
        }
    }
}
