//! Decaying schedules, `base` being the initial learning rate and `t` the 0-based step:
//!
//! - `Constant`: `base`.
//! - `StepDecay`: `base gamma^floor(t / step_size)`.
//! - `MultiStep`: `base gamma^(number of milestones <= t)`.
//! - `Exponential`: `base gamma^t`.
//! - `Cosine`: `eta_min + (base - eta_min) (1 + cos(pi t / t_max)) / 2` (Loshchilov & Hutter).
//! - `Polynomial`: `base (1 - min(t, total) / total)^power`; `power = 1` is linear decay to 0.

use super::Schedule;

pub struct Constant(pub f64);

impl Schedule for Constant {
    fn lr(&self, _step: usize) -> f32 {
        self.0 as f32
    }
}

pub struct StepDecay {
    pub base: f64,
    pub step_size: usize,
    pub gamma: f64,
}

impl Schedule for StepDecay {
    fn lr(&self, t: usize) -> f32 {
        (self.base * self.gamma.powi((t / self.step_size.max(1)) as i32)) as f32
    }
}

pub struct MultiStep {
    pub base: f64,
    pub milestones: Vec<usize>,
    pub gamma: f64,
}

impl Schedule for MultiStep {
    fn lr(&self, t: usize) -> f32 {
        (self.base
            * self
                .gamma
                .powi(self.milestones.iter().filter(|&&m| m <= t).count() as i32)) as f32
    }
}

pub struct Exponential {
    pub base: f64,
    pub gamma: f64,
}

impl Schedule for Exponential {
    fn lr(&self, t: usize) -> f32 {
        (self.base * self.gamma.powi(t as i32)) as f32
    }
}

pub struct Cosine {
    pub base: f64,
    pub t_max: usize,
    pub eta_min: f64,
}

impl Schedule for Cosine {
    fn lr(&self, t: usize) -> f32 {
        let (b, m) = (self.base, self.eta_min);
        let c = (std::f64::consts::PI * t as f64 / self.t_max.max(1) as f64).cos();
        (m + (b - m) * (1.0 + c) / 2.0) as f32
    }
}

pub struct Polynomial {
    pub base: f64,
    pub total: usize,
    pub power: f64,
}

impl Schedule for Polynomial {
    fn lr(&self, t: usize) -> f32 {
        let frac = t.min(self.total) as f64 / self.total.max(1) as f64;
        (self.base * (1.0 - frac).powf(self.power)) as f32
    }
}
