//! The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`):
//! train for a few hundred steps while the learning rate grows exponentially from `start` to
//! `end`, record the loss, smooth it, stop once it exceeds a multiple of its minimum, and
//! suggest a rate. The trainer is put back exactly as it was afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{Callback, Control, Trainer};
use crate::error::{Error, Result};
use crate::run_state::RunState;
use crate::schedule::{Schedule, Unit};
use crate::train::StepEnd;

/// `start (end / start)^(t / (steps - 1))`.
struct ExpRange {
    start: f64,
    end: f64,
    steps: usize,
}

impl Schedule for ExpRange {
    fn lr(&self, step: usize) -> f32 {
        let t = step.min(self.steps - 1) as f64 / (self.steps - 1).max(1) as f64;
        (self.start * (self.end / self.start).powf(t)) as f32
    }
}

/// The result of a range test.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeTest {
    /// `(learning rate, loss, smoothed loss)` of every step run.
    pub points: Vec<(f64, f32, f64)>,
    /// Whether it stopped because the smoothed loss exceeded `diverge` times its minimum.
    pub diverged: bool,
    /// The rate where the smoothed loss falls fastest against log(lr).
    pub steepest: Option<f64>,
    /// The rate of the smoothed loss's minimum, divided by 10.
    pub min_over_10: Option<f64>,
    /// Whether the trainer's stop flag (Ctrl-C) ended it before its last step: `points`
    /// holds the steps run until then.
    pub interrupted: bool,
}

/// Exponential moving average with bias correction (fastai's smoothing, beta = 0.98).
pub fn smooth(losses: &[f32], beta: f64) -> Vec<f64> {
    let mut avg = 0.0;
    losses
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            avg = beta * avg + (1.0 - beta) * l as f64;
            avg / (1.0 - beta.powi(i as i32 + 1))
        })
        .collect()
}

/// The two suggestions for `(lr, smoothed loss)` points: steepest descent of the smoothed loss
/// against log(lr) (central differences, before the minimum, skipping the first tenth of the
/// points, which the smoothing's warm-up distorts), and the minimum's rate divided by 10.
pub fn suggest(points: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    if points.len() < 5 {
        return (None, None);
    }
    let imin = (0..points.len())
        .min_by(|&a, &b| {
            points[a]
                .1
                .partial_cmp(&points[b].1)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .expect("non-empty");
    let skip = points.len() / 10;
    let mut steepest: Option<(f64, f64)> = None;
    for i in (skip.max(1))..imin.min(points.len() - 1) {
        let (l0, l1) = (points[i - 1].0.ln(), points[i + 1].0.ln());
        let slope = (points[i + 1].1 - points[i - 1].1) / (l1 - l0);
        if steepest.is_none_or(|(s, _)| slope < s) {
            steepest = Some((slope, points[i].0));
        }
    }
    (steepest.map(|s| s.1), Some(points[imin].0 / 10.0))
}

/// Records the loss of every step and raises the stop flag when the test is over.
struct Recorder {
    losses: Arc<Mutex<Vec<(f64, f32)>>>,
    steps: usize,
    diverge: f64,
    stop: Arc<AtomicBool>,
    diverged: Arc<AtomicBool>,
    first: u64,
}

impl Callback for Recorder {
    fn wants_step_values(&self, _step: u64) -> bool {
        true
    }
    fn on_step_end(&mut self, s: &StepEnd, _c: &mut Control) -> Result<()> {
        let mut l = self.losses.lock().expect("not poisoned");
        let loss = s.loss.unwrap_or(f32::NAN);
        l.push((s.lr, loss));
        let sm = smooth(&l.iter().map(|p| p.1).collect::<Vec<_>>(), 0.98);
        let last = *sm.last().expect("pushed");
        let min = sm.iter().cloned().fold(f64::INFINITY, f64::min);
        if !last.is_finite() || (l.len() > 10 && last > self.diverge * min) {
            self.diverged.store(true, Ordering::SeqCst);
            self.stop.store(true, Ordering::SeqCst);
        }
        if (s.step - self.first) as usize >= self.steps {
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Trainer {
    /// Run the range test from `start` to `end` over `steps` steps (stopping early when the
    /// smoothed loss exceeds `diverge` times its minimum), then put the model, the optimizer,
    /// the schedule and the position back exactly as they were.
    pub fn lr_find(
        &mut self,
        start: f64,
        end: f64,
        steps: usize,
        diverge: f64,
    ) -> Result<RangeTest> {
        if !(start > 0.0 && end > start && end.is_finite()) {
            return Err(Error::config(
                "lr-find range",
                format!("{start}..{end}"),
                "needs 0 < start < end",
            ));
        }
        if steps < 5 {
            return Err(Error::config(
                "lr-find steps",
                steps,
                "needs at least 5 steps",
            ));
        }
        if self.fit.device_data || self.fit.graph {
            return Err(Error::config(
                "lr-find",
                "device data",
                "the range test reads the loss of every step: run it with the host loader",
            ));
        }
        let saved = RunState::capture(
            &mut self.model,
            &self.optim,
            self.schedule.as_ref(),
            self.fit.seed,
            self.position.0,
        );
        let saved_fit = self.fit.clone();
        let saved_history = self.history.clone();
        let saved_position = self.position;
        let saved_control = self.control.clone();
        let saved_callbacks = std::mem::take(&mut self.callbacks);
        let schedule =
            std::mem::replace(&mut self.schedule, Box::new(ExpRange { start, end, steps }));
        let per_epoch = self.train.len().div_ceil(self.fit.batch_size.max(1));
        self.fit.epochs = self.position.0 + steps.div_ceil(per_epoch) + 1;
        self.fit.unit = Unit::Batch;
        let losses = Arc::new(Mutex::new(Vec::new()));
        let diverged = Arc::new(AtomicBool::new(false));
        self.callbacks.push(Box::new(Recorder {
            losses: losses.clone(),
            steps,
            diverge,
            stop: self.stop.clone(),
            diverged: diverged.clone(),
            first: self.optim.steps(),
        }));
        let validation = self.validation.take();
        let test = self.test.take();
        let last = self.last_checkpoint.take();
        // The schedule counts batches from the start of the run: offset to the test's start.
        let result = self.run_from_step(self.position.0 * per_epoch + self.position.1);
        // Everything back, whatever happened.
        self.validation = validation;
        self.test = test;
        self.last_checkpoint = last;
        self.callbacks = saved_callbacks;
        self.schedule = schedule;
        self.fit = saved_fit;
        self.history = saved_history;
        self.position = saved_position;
        self.control = saved_control;
        // Set by the recorder at the last step or at divergence, or from outside (Ctrl-C).
        let stopped = self.stop.swap(false, Ordering::SeqCst);
        saved.restore(
            &mut self.model,
            &mut self.optim,
            self.schedule.as_mut(),
            "the state before lr-find",
        )?;
        match result {
            Ok(()) | Err(Error::Diverged { .. }) => {}
            Err(e) => return Err(e),
        }
        let raw = losses.lock().expect("not poisoned").clone();
        let sm = smooth(&raw.iter().map(|p| p.1).collect::<Vec<_>>(), 0.98);
        let points: Vec<(f64, f32, f64)> = raw
            .iter()
            .zip(&sm)
            .map(|(&(lr, l), &s)| (lr, l, s))
            .collect();
        let finite: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.2.is_finite())
            .map(|p| (p.0, p.2))
            .collect();
        let (steepest, min_over_10) = suggest(&finite);
        let diverged = diverged.load(Ordering::SeqCst) || raw.iter().any(|p| !p.1.is_finite());
        Ok(RangeTest {
            interrupted: stopped && !diverged && points.len() < steps,
            points,
            diverged,
            steepest,
            min_over_10,
        })
    }

    /// Run with the schedule's step 0 at optimizer update `offset` (the range test).
    fn run_from_step(&mut self, offset: usize) -> Result<()> {
        if offset > 0 {
            let inner =
                std::mem::replace(&mut self.schedule, Box::new(crate::schedule::Constant(0.0)));
            self.schedule = Box::new(Offset { inner, offset });
        }
        self.run().map(|_| ())
    }
}

/// A schedule started `offset` steps late.
struct Offset {
    inner: Box<dyn Schedule>,
    offset: usize,
}

impl Schedule for Offset {
    fn lr(&self, step: usize) -> f32 {
        self.inner.lr(step.saturating_sub(self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted loss curve: flat, then falling fastest around lr = 1e-2, minimum at 1e-1,
    /// then rising.
    #[test]
    fn suggestions_on_a_scripted_curve() {
        let pts: Vec<(f64, f64)> = (0..200)
            .map(|i| {
                let lr = 1e-5 * 10f64.powf(i as f64 * 5.0 / 199.0); // 1e-5 .. 1
                let x = lr.log10(); // -5 .. 0
                                    // A smooth step centred at log10 = -2, then a rise after -1.
                let loss = 2.0 - 1.5 / (1.0 + (-(x + 2.0) * 4.0).exp())
                    + if x > -1.0 {
                        5.0 * (x + 1.0).powi(2)
                    } else {
                        0.0
                    };
                (lr, loss)
            })
            .collect();
        let (steep, min10) = suggest(&pts);
        let steep = steep.unwrap();
        assert!((steep.log10() + 2.0).abs() < 0.05, "{steep}");
        let min10 = min10.unwrap();
        // The minimum is just before the rise at 1e-1 (the step still falls a little).
        assert!(min10 > 3e-3 && min10 < 1.5e-2, "{min10}");
    }

    #[test]
    fn smoothing_is_bias_corrected() {
        let s = smooth(&[2.0, 2.0, 2.0], 0.98);
        assert!(s.iter().all(|&v| (v - 2.0).abs() < 1e-12), "{s:?}");
    }
}
