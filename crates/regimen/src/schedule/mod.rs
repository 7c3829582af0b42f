//! Learning-rate schedules: each is a pure function `lr(step)` of the 0-based step (the
//! learning rate used by the `step`-th update), except [`ReduceOnPlateau`], which reacts to a
//! metric. A step is a batch or an epoch, as the caller counts ([`Unit`]).
//!
//! Each matches `torch.optim.lr_scheduler` value by value (`tests/schedule.rs` checks the
//! whole sequences against fixtures from `tools/golden_optim.py`):
//!
//! | regimen | PyTorch |
//! |---|---|
//! | [`Constant`] | none (a fixed lr) |
//! | [`StepDecay`] | `StepLR` |
//! | [`MultiStep`] | `MultiStepLR` |
//! | [`Exponential`] | `ExponentialLR` |
//! | [`Cosine`] | `CosineAnnealingLR` |
//! | [`Polynomial`] (power 1 = linear decay) | `PolynomialLR` |
//! | [`Warmup`] in front of any schedule | `SequentialLR([LinearLR or ConstantLR, s])` |
//! | [`Cyclic`] (triangular, triangular2, exp_range) | `CyclicLR` |
//! | [`OneCycle`] | `OneCycleLR` |
//! | [`CosineRestarts`] | `CosineAnnealingWarmRestarts` |
//! | [`ReduceOnPlateau`] | `ReduceLROnPlateau` |
//! | [`Sequential`] | `SequentialLR` |
//!
//! The lecture: decay the learning rate so training settles; warm up ("high initial learning
//! rates can make loss explode; linearly increasing learning rate from 0 ... can prevent
//! this"), constant or gradual; cycle it to escape saddle points; and scale it with the batch
//! size ([`crate::optim::scale_lr`]).

mod cyclic;
mod decay;
mod parse;
mod plateau;

pub use cyclic::{Anneal, CosineRestarts, Cyclic, CyclicMode, OneCycle};
pub use decay::{Constant, Cosine, Exponential, MultiStep, Polynomial, StepDecay};
pub use parse::{parse_schedule, ScheduleSpec};
pub use plateau::ReduceOnPlateau;

/// A learning-rate schedule.
pub trait Schedule: Send {
    /// The learning rate for the 0-based `step`.
    fn lr(&self, step: usize) -> f32;
    /// Report a validation metric (lower is better); only [`ReduceOnPlateau`] listens.
    fn observe(&mut self, _metric: f32) {}
    /// What the schedule has learned from `observe` (empty for the pure functions of the step),
    /// for a run state; [`Schedule::set_state`] restores it.
    fn state(&self) -> Vec<f64> {
        Vec::new()
    }
    /// Restore [`Schedule::state`]; an error (and no change) when it does not fit.
    fn set_state(&mut self, state: &[f64]) -> crate::Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::config(
                "schedule state",
                format!("{} values", state.len()),
                "this schedule keeps no state",
            ))
        }
    }
}

/// Whether a schedule's step counts batches or epochs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Batch,
    Epoch,
}

impl Unit {
    /// The schedule step of the `batch`-th update (0-based) with `per_epoch` batches an epoch.
    pub fn step(self, batch: usize, per_epoch: usize) -> usize {
        match self {
            Unit::Batch => batch,
            Unit::Epoch => batch / per_epoch.max(1),
        }
    }
}

/// How a warmup ramps up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WarmupKind {
    /// `factor` times the learning rate for the whole warmup (the lecture's "constant warmup";
    /// PyTorch's `ConstantLR`).
    Constant { factor: f64 },
    /// From `start_factor` to 1 linearly (the lecture's "gradual warmup"; `LinearLR`).
    Linear { start_factor: f64 },
}

/// A warmup of `steps` steps in front of `then`, which starts its own step count at 0 when the
/// warmup ends and whose first value is the warmup's target.
pub struct Warmup {
    pub kind: WarmupKind,
    pub steps: usize,
    pub then: Box<dyn Schedule>,
}

impl Schedule for Warmup {
    fn lr(&self, step: usize) -> f32 {
        if step >= self.steps {
            return self.then.lr(step - self.steps);
        }
        let target = self.then.lr(0) as f64;
        (match self.kind {
            WarmupKind::Constant { factor } => target * factor,
            WarmupKind::Linear { start_factor } => {
                target * (start_factor + (1.0 - start_factor) * step as f64 / self.steps as f64)
            }
        }) as f32
    }
    fn observe(&mut self, metric: f32) {
        self.then.observe(metric);
    }
    fn state(&self) -> Vec<f64> {
        self.then.state()
    }
    fn set_state(&mut self, state: &[f64]) -> crate::Result<()> {
        self.then.set_state(state)
    }
}

/// Schedules one after another: `schedules[i]` runs from `milestones[i - 1]` (its step 0)
/// until `milestones[i]`.
pub struct Sequential {
    pub schedules: Vec<Box<dyn Schedule>>,
    pub milestones: Vec<usize>,
}

impl Schedule for Sequential {
    fn lr(&self, step: usize) -> f32 {
        let i = self.milestones.iter().take_while(|&&m| m <= step).count();
        let start = if i == 0 { 0 } else { self.milestones[i - 1] };
        self.schedules[i].lr(step - start)
    }
    fn observe(&mut self, metric: f32) {
        for s in &mut self.schedules {
            s.observe(metric);
        }
    }
    /// Each schedule's state, preceded by its length.
    fn state(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for s in &self.schedules {
            let st = s.state();
            out.push(st.len() as f64);
            out.extend(st);
        }
        out
    }
    fn set_state(&mut self, state: &[f64]) -> crate::Result<()> {
        // Split first, so that a bad state changes nothing.
        let mut parts = Vec::new();
        let mut rest = state;
        for _ in &self.schedules {
            let n = rest.first().copied().unwrap_or(-1.0);
            if !(n >= 0.0 && n.fract() == 0.0 && (n as usize) < rest.len()) {
                return Err(crate::Error::config(
                    "schedule state",
                    format!("{} values", state.len()),
                    "does not fit these schedules",
                ));
            }
            parts.push(&rest[1..1 + n as usize]);
            rest = &rest[1 + n as usize..];
        }
        if !rest.is_empty() {
            return Err(crate::Error::config(
                "schedule state",
                format!("{} values", state.len()),
                "does not fit these schedules",
            ));
        }
        for (s, p) in self.schedules.iter_mut().zip(parts) {
            s.set_state(p)?;
        }
        Ok(())
    }
}
