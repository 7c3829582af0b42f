//! Reduce the learning rate when a metric stops improving (PyTorch's `ReduceLROnPlateau`,
//! mode "min", relative threshold).
//!
//! After each [`Schedule::observe`]: the metric is an improvement if
//! `metric < best (1 - threshold)`; after more than `patience` observations without one, the
//! learning rate is multiplied by `factor` (not below `min_lr`) and `cooldown` observations are
//! ignored before counting again.

use super::Schedule;

pub struct ReduceOnPlateau {
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub cooldown: usize,
    pub min_lr: f64,
    lr: f64,
    best: f64,
    bad: usize,
    cooldown_left: usize,
}

impl ReduceOnPlateau {
    pub fn new(
        base: f64,
        factor: f64,
        patience: usize,
        threshold: f64,
        cooldown: usize,
        min_lr: f64,
    ) -> ReduceOnPlateau {
        ReduceOnPlateau {
            factor,
            patience,
            threshold,
            cooldown,
            min_lr,
            lr: base,
            best: f64::INFINITY,
            bad: 0,
            cooldown_left: 0,
        }
    }
}

impl Schedule for ReduceOnPlateau {
    fn lr(&self, _step: usize) -> f32 {
        self.lr as f32
    }

    fn observe(&mut self, metric: f32) {
        let metric = metric as f64;
        if metric < self.best * (1.0 - self.threshold) {
            self.best = metric;
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.bad = 0;
        }
        if self.bad > self.patience {
            let new = (self.lr * self.factor).max(self.min_lr);
            if self.lr - new > 1e-8 {
                self.lr = new;
            }
            self.cooldown_left = self.cooldown;
            self.bad = 0;
        }
    }

    /// `[lr, best, bad, cooldown_left]`.
    fn state(&self) -> Vec<f64> {
        vec![
            self.lr,
            self.best,
            self.bad as f64,
            self.cooldown_left as f64,
        ]
    }

    fn set_state(&mut self, state: &[f64]) -> crate::Result<()> {
        match *state {
            [lr, best, bad, cooldown]
                if lr.is_finite() && lr >= 0.0 && bad >= 0.0 && cooldown >= 0.0 =>
            {
                self.lr = lr;
                self.best = best;
                self.bad = bad as usize;
                self.cooldown_left = cooldown as usize;
                Ok(())
            }
            _ => Err(crate::Error::config(
                "schedule state",
                format!("{state:?}"),
                "reduce-on-plateau keeps [lr, best, bad, cooldown_left]",
            )),
        }
    }
}
