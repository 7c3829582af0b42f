//! Schedules that go up as well as down.
//!
//! - [`Cyclic`] (Smith, 2017): between `base` and `max` in cycles of `up + down` steps. With
//!   `cycle = floor(1 + t / (up + down))`, `x = 1 + t / (up + down) - cycle` and
//!   `r = up / (up + down)`, the height is `x / r` going up and `(x - 1) / (r - 1)` going down,
//!   and `lr = base + (max - base) height scale`, where `scale` is 1 (triangular),
//!   `1 / 2^(cycle - 1)` (triangular2) or `gamma^t` (exp_range). PyTorch's `CyclicLR`.
//! - [`OneCycle`] (Smith & Topin, 2019): from `max / div` up to `max` over the first
//!   `pct_start` of the steps, then down to `max / div / final_div` (or with `three_phase`: up,
//!   back down to `max / div`, then to the minimum), annealed by cosine or linearly.
//!   PyTorch's `OneCycleLR`, phase boundaries included.
//! - [`CosineRestarts`] (SGDR, Loshchilov & Hutter, 2017): cosine from `base` to `eta_min` over
//!   `t_0` steps, then restart, each period `t_mult` times longer.

use super::Schedule;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CyclicMode {
    Triangular,
    Triangular2,
    ExpRange { gamma: f64 },
}

pub struct Cyclic {
    pub base: f64,
    pub max: f64,
    pub up: usize,
    pub down: usize,
    pub mode: CyclicMode,
}

impl Schedule for Cyclic {
    fn lr(&self, t: usize) -> f32 {
        let total = (self.up + self.down).max(1) as f64;
        let ratio = self.up as f64 / total;
        let cycle = (1.0 + t as f64 / total).floor();
        let x = 1.0 + t as f64 / total - cycle;
        let height = if x <= ratio {
            x / ratio
        } else {
            (x - 1.0) / (ratio - 1.0)
        };
        let scale = match self.mode {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
            CyclicMode::ExpRange { gamma } => gamma.powi(t as i32),
        };
        (self.base + (self.max - self.base) * height * scale) as f32
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anneal {
    Cos,
    Linear,
}

impl Anneal {
    fn between(self, start: f64, end: f64, pct: f64) -> f64 {
        match self {
            Anneal::Cos => end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }
}

pub struct OneCycle {
    pub max: f64,
    pub total: usize,
    pub pct_start: f64,
    pub div: f64,
    pub final_div: f64,
    pub anneal: Anneal,
    pub three_phase: bool,
}

impl Schedule for OneCycle {
    fn lr(&self, t: usize) -> f32 {
        let max = self.max;
        let initial = max / self.div;
        let min = initial / self.final_div;
        let up_end = self.pct_start * self.total as f64 - 1.0;
        let last = self.total as f64 - 1.0;
        // (end step, start lr, end lr) of each phase, as PyTorch lays them out.
        let phases: Vec<(f64, f64, f64)> = if self.three_phase {
            vec![
                (up_end, initial, max),
                (2.0 * self.pct_start * self.total as f64 - 2.0, max, initial),
                (last, initial, min),
            ]
        } else {
            vec![(up_end, initial, max), (last, max, min)]
        };
        let t = t as f64;
        let mut start_step = 0.0;
        for (i, &(end, a, b)) in phases.iter().enumerate() {
            if t <= end || i == phases.len() - 1 {
                let pct = (t - start_step) / (end - start_step);
                return self.anneal.between(a, b, pct) as f32;
            }
            start_step = end;
        }
        unreachable!("the last phase always returns")
    }
}

pub struct CosineRestarts {
    pub base: f64,
    pub t_0: usize,
    pub t_mult: usize,
    pub eta_min: f64,
}

impl Schedule for CosineRestarts {
    fn lr(&self, t: usize) -> f32 {
        let (mut t_cur, mut t_i) = (t, self.t_0.max(1));
        if self.t_mult <= 1 {
            t_cur %= t_i; // equal periods: no loop over the restarts
        }
        while t_cur >= t_i {
            t_cur -= t_i;
            t_i *= self.t_mult.max(1);
        }
        let (b, m) = (self.base, self.eta_min);
        let c = (std::f64::consts::PI * t_cur as f64 / t_i as f64).cos();
        (m + (b - m) * (1.0 + c) / 2.0) as f32
    }
}
