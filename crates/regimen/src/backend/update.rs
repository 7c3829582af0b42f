//! Optimizer update rules, as data and as per-element maths.
//!
//! `optim/` keeps the hyperparameters, their validation, parameter groups and the state
//! bookkeeping; a backend runs one of these rules over every parameter in one call
//! ([`super::Backend::optim_update`]). The maths of each rule is written out in its optimizer's
//! doc (`optim/sgd.rs`, `adagrad.rs`, `rmsprop.rs`, `adam.rs`); here it is per element, in the
//! arithmetic (f32 values, f64 hyperparameters rounded once) that matches `torch.optim`.
//!
//! Per element, before the rule: `g = grad * grad_scale` (the clipping coefficient, when there
//! is one), then `g += wd theta` for L2 weight decay (not for AdamW, which decays `theta`
//! itself). After the rule the gradient is set to zero, as `Optim::step` promises.

/// An update rule with its hyperparameters (f64, like PyTorch's Python floats).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateRule {
    /// State: `[momentum buffer]` when `momentum != 0`, else none.
    Sgd {
        momentum: f64,
        dampening: f64,
        nesterov: bool,
    },
    /// State: `[sum of squares]`, starting at `initial`.
    Adagrad {
        lr_decay: f64,
        eps: f64,
        initial: f64,
    },
    /// State: `[square average]`, then `[gradient average]` when centered, then
    /// `[momentum buffer]` when `momentum > 0`.
    RmsProp {
        alpha: f64,
        eps: f64,
        momentum: f64,
        centered: bool,
    },
    /// State: `[m, v]`, then `[v max]` with AMSGrad. `decoupled` is AdamW.
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        amsgrad: bool,
        decoupled: bool,
    },
}

impl UpdateRule {
    /// State tensors per parameter, each of the parameter's shape.
    pub fn slots(&self) -> usize {
        match *self {
            UpdateRule::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            UpdateRule::Adagrad { .. } => 1,
            UpdateRule::RmsProp {
                momentum, centered, ..
            } => 1 + usize::from(centered) + usize::from(momentum > 0.0),
            UpdateRule::Adam { amsgrad, .. } => 2 + usize::from(amsgrad),
        }
    }

    /// Whether state slot `k` is a sum or average of squares, which cannot be negative
    /// (Adagrad's sum, RMSprop's square average, Adam's second moment and its AMSGrad
    /// maximum): a negative value in a saved state is damage.
    pub fn nonnegative_slot(&self, k: usize) -> bool {
        match *self {
            UpdateRule::Sgd { .. } => false,
            UpdateRule::Adagrad { .. } | UpdateRule::RmsProp { .. } => k == 0,
            UpdateRule::Adam { .. } => k >= 1,
        }
    }

    /// The initial value of every state element.
    pub fn initial_state(&self) -> f32 {
        match *self {
            UpdateRule::Adagrad { initial, .. } => initial as f32,
            _ => 0.0,
        }
    }

    /// Whether weight decay is applied by the rule itself (AdamW) instead of joining the
    /// gradient as `wd theta` (L2).
    pub fn decoupled(&self) -> bool {
        matches!(
            self,
            UpdateRule::Adam {
                decoupled: true,
                ..
            }
        )
    }

    /// The scalars of one step that do not depend on the element, computed once per
    /// parameter tensor: `[a, b]` with meanings per rule (see [`update_element`]).
    pub fn step_scalars(&self, lr: f32, step: u64) -> [f32; 2] {
        match *self {
            UpdateRule::Sgd { .. } | UpdateRule::RmsProp { .. } => [lr, 0.0],
            UpdateRule::Adagrad { lr_decay, .. } => [
                (lr as f64 / (1.0 + (step - 1) as f64 * lr_decay)) as f32,
                0.0,
            ],
            UpdateRule::Adam { beta1, beta2, .. } => {
                // Bias corrections in double precision, as PyTorch's Python floats.
                let bc1 = (1.0 - beta1.powi(step as i32)) as f32;
                let bc2 = (1.0 - beta2.powi(step as i32)).sqrt() as f32;
                [lr / bc1, bc2]
            }
        }
    }
}

/// One element of one rule: `theta` updated from gradient `g` (scaled, with L2 decay already
/// added) and the state `s` (as many as [`UpdateRule::slots`]). `first` is true on the first
/// step; `sc` are [`UpdateRule::step_scalars`]; `lr` and `wd` are this parameter's learning
/// rate and weight decay (used by AdamW's decoupled decay).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn update_element(
    rule: &UpdateRule,
    first: bool,
    sc: [f32; 2],
    lr: f32,
    wd: f32,
    theta: &mut f32,
    g: f32,
    s: &mut [f32; 3],
) {
    match *rule {
        UpdateRule::Sgd {
            momentum,
            dampening,
            nesterov,
        } => sgd(momentum, dampening, nesterov, first, sc, theta, g, s),
        UpdateRule::Adagrad { eps, .. } => adagrad(eps, sc, theta, g, s),
        UpdateRule::RmsProp {
            alpha,
            eps,
            momentum,
            centered,
        } => rmsprop(alpha, eps, momentum, centered, sc, theta, g, s),
        UpdateRule::Adam {
            beta1,
            beta2,
            eps,
            amsgrad,
            decoupled,
        } => adam(
            beta1, beta2, eps, amsgrad, decoupled, sc, lr, wd, theta, g, s,
        ),
    }
}

// One function per rule, so that a backend can pick the rule once, outside its loop.

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn sgd(
    momentum: f64,
    dampening: f64,
    nesterov: bool,
    first: bool,
    sc: [f32; 2],
    theta: &mut f32,
    g: f32,
    s: &mut [f32; 3],
) {
    let step = if momentum != 0.0 {
        let (mu, keep) = (momentum as f32, (1.0 - dampening) as f32);
        s[0] = if first { g } else { mu * s[0] + keep * g };
        if nesterov {
            g + mu * s[0]
        } else {
            s[0]
        }
    } else {
        g
    };
    *theta -= sc[0] * step;
}

#[inline(always)]
pub fn adagrad(eps: f64, sc: [f32; 2], theta: &mut f32, g: f32, s: &mut [f32; 3]) {
    s[0] += g * g;
    *theta -= sc[0] * g / (s[0].sqrt() + eps as f32);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn rmsprop(
    alpha: f64,
    eps: f64,
    momentum: f64,
    centered: bool,
    sc: [f32; 2],
    theta: &mut f32,
    g: f32,
    s: &mut [f32; 3],
) {
    let (a, one_minus, eps, mu) = (
        alpha as f32,
        (1.0 - alpha) as f32,
        eps as f32,
        momentum as f32,
    );
    s[0] = a * s[0] + one_minus * g * g;
    let d = if centered {
        // PyTorch's lerp form, which rounds differently from alpha c + (1 - alpha) g; the
        // centered denominator cancels and amplifies the difference.
        s[1] += one_minus * (g - s[1]);
        (s[0] - s[1] * s[1]).sqrt() + eps
    } else {
        s[0].sqrt() + eps
    };
    if momentum > 0.0 {
        let b = usize::from(centered) + 1;
        s[b] = mu * s[b] + g / d;
        *theta -= sc[0] * s[b];
    } else {
        *theta -= sc[0] * g / d;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn adam(
    beta1: f64,
    beta2: f64,
    eps: f64,
    amsgrad: bool,
    decoupled: bool,
    sc: [f32; 2],
    lr: f32,
    wd: f32,
    theta: &mut f32,
    g: f32,
    s: &mut [f32; 3],
) {
    if decoupled {
        *theta *= 1.0 - lr * wd;
    }
    s[0] += (1.0 - beta1) as f32 * (g - s[0]); // PyTorch's lerp
    s[1] = beta2 as f32 * s[1] + (1.0 - beta2) as f32 * g * g;
    let second = if amsgrad {
        s[2] = s[2].max(s[1]);
        s[2]
    } else {
        s[1]
    };
    let denom = second.sqrt() / sc[1] + eps as f32;
    *theta -= sc[0] * s[0] / denom;
}
