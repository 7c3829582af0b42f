//! The trainer: the practice around the training step.
//!
//! A [`Trainer`] owns a model, its optimizer and schedule, the data (training set, an optional
//! validation split, an optional test set) and the fitted preprocessing, and runs the loop of
//! [`crate::train::fit_with`] with [`Callback`]s that see every step and epoch and may stop the
//! run or change the learning rate. After each epoch it records a [`Record`] (training and
//! validation loss and accuracy, the generalization gap, the learning rate, samples per
//! second); the test set is evaluated once, at the end.
//!
//! Callbacks shipped ([`callbacks`]): [`EarlyStopping`] (metric, mode, patience, min delta,
//! restore the best weights), [`BestCheckpoint`] (keep the best snapshot on disk),
//! [`SnapshotEnsemble`] (a snapshot at the end of each cycle of a cyclic or warm-restart
//! schedule, Huang et al. 2017), [`MetricsCsv`] (one row per epoch), and the TensorBoard event
//! writer ([`crate::tensorboard::TensorBoard`]). The NaN/inf guard is part of the loop itself
//! (it costs one device flag per step): a non-finite loss stops the run with
//! [`crate::Error::Diverged`] naming the epoch and the step, the model is put back to its state
//! at the start of that epoch, and the last checkpoint written stays the last good one.
//!
//! Checkpoints hold the whole run ([`Trainer::save_checkpoint`]): parameters and buffers under
//! their PyTorch names, the optimizer's state (`optim.*`), the schedule's state, the step, the
//! seed, the loader position (epoch and batch), the history of records, the resolved config
//! (`meta`) and the preprocessing (`preprocess.*`), in one safetensors file written
//! atomically. [`Trainer::resume`] continues such a run bit for bit where the uninterrupted run
//! would be, also from the middle of an epoch (an interrupt: [`Trainer::stop_flag`]).

pub mod callbacks;
pub mod lr_find;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::data::{Dataset, PreprocessKind, Preprocessor};
use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::layers::Sequential;
use crate::optim::Optim;
use crate::run_state::RunState;
use crate::schedule::Schedule;
use crate::train::{evaluate, fit_with, EpochStats, FitConfig, Hooks, StepEnd};

pub use callbacks::{
    best_record_by, BestCheckpoint, EarlyStopping, MetricsCsv, Mode, SnapshotEnsemble,
};

/// One epoch of a run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub epoch: usize,
    pub train_loss: f32,
    pub train_acc: f32,
    /// Loss and accuracy on the validation split (none without one).
    pub val_loss: Option<f32>,
    pub val_acc: Option<f32>,
    /// The generalization gap: training accuracy minus validation accuracy.
    pub gap: Option<f32>,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    pub samples_per_sec: f64,
    pub seconds: f64,
    /// Optimizer updates since the start of the run.
    pub step: u64,
}

impl Record {
    fn from_stats(s: &EpochStats, has_val: bool) -> Record {
        // A non-finite validation figure is kept as it is (never better than another, shown
        // as NaN or inf): only a run without a validation split has none.
        let val = |v: f32| has_val.then_some(v);
        Record {
            epoch: s.epoch,
            train_loss: s.train_loss,
            train_acc: s.train_acc,
            val_loss: val(s.test_loss),
            val_acc: val(s.test_acc),
            gap: val(s.test_acc).map(|v| s.train_acc - v),
            lr: s.lr as f64,
            samples_per_sec: s.samples as f64 / (s.seconds as f64).max(1e-9),
            seconds: s.seconds as f64,
            step: s.steps,
        }
    }

    /// A metric by name: `train_loss`, `train_acc`, `val_loss`, `val_acc`, `gap`, `lr`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "train_loss" => Some(self.train_loss as f64),
            "train_acc" => Some(self.train_acc as f64),
            "val_loss" => self.val_loss.map(f64::from),
            "val_acc" => self.val_acc.map(f64::from),
            "gap" => self.gap.map(f64::from),
            "lr" => Some(self.lr),
            _ => None,
        }
    }

    /// The metric names [`Record::metric`] knows.
    pub const METRICS: &'static [&'static str] = &[
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "gap",
        "lr",
    ];
}

/// What callbacks may change: stop the run, scale the learning rate.
#[derive(Clone, Debug, Default)]
pub struct Control {
    stop: Option<String>,
    lr_scale: Option<f64>,
}

impl Control {
    /// Stop at the end of this epoch, with the reason the summary gives.
    pub fn stop(&mut self, reason: impl Into<String>) {
        self.stop.get_or_insert(reason.into());
    }
    pub fn stopping(&self) -> Option<&str> {
        self.stop.as_deref()
    }
    /// Multiply the schedule's learning rate by `factor` from now on (from the next step on
    /// the host loop, from the next epoch on the on-device loop). Persisted in checkpoints.
    pub fn set_lr_scale(&mut self, factor: f64) {
        self.lr_scale = Some(factor);
    }
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale.unwrap_or(1.0)
    }
}

/// The end of an epoch as a callback sees it: the record, the model, and a way to write a
/// checkpoint of the whole run.
pub struct EpochEnd<'a> {
    pub record: &'a Record,
    /// Every record so far, this one last.
    pub history: &'a [Record],
    pub model: &'a mut dyn Layer,
    /// The learning rate of the next epoch's first step (none after the last epoch).
    pub next_lr: Option<f64>,
    /// Whether this epoch ends a learning-rate cycle ([`ends_cycle`]); the last epoch does,
    /// unless its rate is higher than the epoch before's (a restart just began).
    pub ends_cycle: bool,
    pub control: &'a mut Control,
    saver: &'a Saver<'a>,
}

impl EpochEnd<'_> {
    /// Write a checkpoint of the whole run, as of the end of this epoch, to `path`.
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        self.saver
            .save(self.model, path, self.history, self.control.lr_scale())
    }
}

/// Hooks into a run. Every method has a default that does nothing.
pub trait Callback: Send {
    /// Before the first step; `history` holds the records of a resumed run (a callback with
    /// state rebuilds it from them).
    fn on_train_begin(&mut self, _history: &[Record], _control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_epoch_begin(&mut self, _epoch: usize, _control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_step_begin(&mut self, _epoch: usize, _batch: usize) -> Result<()> {
        Ok(())
    }
    /// After every step. `step.loss` and `step.grad_norm` are set on the steps
    /// [`Callback::wants_step_values`] asks for (host loop only).
    fn on_step_end(&mut self, _step: &StepEnd, _control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn wants_step_values(&self, _step: u64) -> bool {
        false
    }
    fn on_epoch_end(&mut self, _end: &mut EpochEnd) -> Result<()> {
        Ok(())
    }
    /// After the last epoch (or the stop), before the final test.
    fn on_train_end(&mut self, _history: &[Record], _model: &mut dyn Layer) -> Result<()> {
        Ok(())
    }
}

/// Why a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// Every epoch ran.
    Completed,
    /// A callback stopped it (early stopping), with its reason.
    Stopped(String),
    /// [`Trainer::stop_flag`] was raised: the run stopped after a step and can be resumed
    /// from `(epoch, batch)`.
    Interrupted { epoch: usize, batch: usize },
}

/// The end of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub ending: Ending,
    /// Test loss and accuracy of the final model (after callbacks such as early stopping's
    /// restore), when a test set was given and the run was not interrupted.
    pub test: Option<(f32, f32)>,
    /// The epoch with the best validation accuracy (the last epoch without validation).
    pub best: Option<Record>,
    pub seconds: f64,
}

/// What a checkpoint needs besides the model.
struct Saver<'a> {
    optim: &'a Optim,
    schedule: &'a dyn Schedule,
    seed: u64,
    /// Epochs completed, next batch, partial sums (mid-epoch).
    position: (usize, usize, Option<[f64; 3]>),
    meta: &'a BTreeMap<String, String>,
    preprocess: Option<&'a Preprocessor>,
    global_batch: usize,
}

impl Saver<'_> {
    fn save(
        &self,
        model: &mut dyn Layer,
        path: &Path,
        history: &[Record],
        lr_scale: f64,
    ) -> Result<()> {
        let (done, batch, partial) = self.position;
        let mut state = RunState::capture(model, self.optim, self.schedule, self.seed, done);
        let mut meta = self.meta.clone();
        meta.extend(std::mem::take(&mut state.meta));
        meta.insert("format".into(), "regimen-checkpoint-1".into());
        meta.insert("next_batch".into(), batch.to_string());
        // The batch over all data-parallel ranks: a run resumed on another number of ranks
        // finds its place in the epoch by samples.
        meta.insert("global_batch".into(), self.global_batch.to_string());
        if let Some([l, c, n]) = partial {
            meta.insert("partial".into(), format!("{l},{c},{n}"));
        }
        meta.insert("lr_scale".into(), lr_scale.to_string());
        meta.insert(
            "history".into(),
            serde_json::to_string(history).expect("records serialize"),
        );
        if let Some(p) = self.preprocess {
            let (tensors, pmeta) = p.to_named();
            state.tensors.extend(tensors);
            meta.extend(pmeta);
        }
        state.meta = meta;
        state.save(path)
    }
}

/// The data of a run, prepared: the validation split taken from the training set, the
/// preprocessing fitted on what remains and applied to every split.
pub struct Prepared {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    pub test: Dataset,
    pub preprocess: Preprocessor,
}

impl Prepared {
    /// Hold out `validation` (a fraction in `[0, 1)`, drawn with `seed`) of `train`, fit `kind`
    /// on the rest, apply it to the three splits.
    pub fn new(
        train: Dataset,
        test: Dataset,
        kind: PreprocessKind,
        validation: f64,
        seed: u64,
    ) -> Result<Prepared> {
        let (mut train, validation) = if validation > 0.0 {
            let (t, v) = train.split(validation, seed)?;
            if v.is_empty() || t.is_empty() {
                return Err(Error::config(
                    "validation",
                    validation,
                    &format!(
                        "leaves {} training and {} validation images: both need at least one",
                        t.len(),
                        v.len()
                    ),
                ));
            }
            (t, Some(v))
        } else {
            (train, None)
        };
        // Statistics from the training split only, applied unchanged to the others.
        let preprocess = Preprocessor::fit(kind, &train)?;
        preprocess.apply(&mut train)?;
        let mut test = test;
        preprocess.apply(&mut test)?;
        let validation = match validation {
            Some(mut v) => {
                preprocess.apply(&mut v)?;
                Some(v)
            }
            None => None,
        };
        Ok(Prepared {
            train,
            validation,
            test,
            preprocess,
        })
    }
}

/// The training run: model, optimizer, schedule, data, callbacks.
pub struct Trainer {
    pub model: Sequential,
    pub optim: Optim,
    pub schedule: Box<dyn Schedule>,
    pub fit: FitConfig,
    pub train: Arc<Dataset>,
    pub validation: Option<Dataset>,
    pub test: Option<Dataset>,
    pub preprocess: Option<Preprocessor>,
    /// Stored in every checkpoint: the resolved config, the model spec, the dataset...
    pub meta: BTreeMap<String, String>,
    callbacks: Vec<Box<dyn Callback>>,
    history: Vec<Record>,
    control: Control,
    stop: Arc<AtomicBool>,
    /// Where a resumed run continues: `(epochs done, next batch, partial sums)`.
    position: (usize, usize, Option<[f64; 3]>),
    last_checkpoint: Option<PathBuf>,
}

impl Trainer {
    pub fn new(
        model: Sequential,
        optim: Optim,
        schedule: Box<dyn Schedule>,
        fit: FitConfig,
        train: Dataset,
    ) -> Trainer {
        Trainer {
            model,
            optim,
            schedule,
            fit,
            train: Arc::new(train),
            validation: None,
            test: None,
            preprocess: None,
            meta: BTreeMap::new(),
            callbacks: Vec::new(),
            history: Vec::new(),
            control: Control::default(),
            stop: Arc::new(AtomicBool::new(false)),
            position: (0, 0, None),
            last_checkpoint: None,
        }
    }

    pub fn with_validation(mut self, validation: Option<Dataset>) -> Trainer {
        self.validation = validation;
        self
    }
    pub fn with_test(mut self, test: Option<Dataset>) -> Trainer {
        self.test = test;
        self
    }
    pub fn with_preprocess(mut self, preprocess: Option<Preprocessor>) -> Trainer {
        self.preprocess = preprocess;
        self
    }
    pub fn with_meta(mut self, meta: BTreeMap<String, String>) -> Trainer {
        self.meta = meta;
        self
    }
    /// Write the whole run's state to `path` after every epoch and at an interrupt (the
    /// `last` checkpoint of a run folder).
    pub fn checkpoint_every_epoch(mut self, path: PathBuf) -> Trainer {
        self.last_checkpoint = Some(path);
        self
    }
    pub fn callback(mut self, callback: impl Callback + 'static) -> Trainer {
        self.callbacks.push(Box::new(callback));
        self
    }
    pub fn add_callback(&mut self, callback: Box<dyn Callback>) {
        self.callbacks.push(callback);
    }

    /// Raise it (from a Ctrl-C handler, another thread) to stop after the current step; the
    /// run then ends [`Ending::Interrupted`] and a checkpoint written after it resumes exactly.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    pub fn history(&self) -> &[Record] {
        &self.history
    }

    /// Samples per step over all data-parallel ranks ([`crate::dist`]).
    pub fn global_batch(&self) -> usize {
        self.fit.batch_size.max(1) * crate::dist::world().size()
    }

    /// Optimizer steps in an epoch (of the global batch).
    pub fn batches_per_epoch(&self) -> usize {
        crate::data::batches_per_epoch(
            self.train.len(),
            self.global_batch(),
            crate::dist::world().size(),
        )
    }

    /// Epochs done and the next batch: where [`Trainer::run`] starts.
    pub fn position(&self) -> (usize, usize) {
        (self.position.0, self.position.1)
    }

    /// Write the whole run's state, as it is now, to `path` (atomically).
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        let saver = Saver {
            optim: &self.optim,
            schedule: self.schedule.as_ref(),
            seed: self.fit.seed,
            position: self.position,
            meta: &self.meta,
            preprocess: self.preprocess.as_ref(),
            global_batch: self.global_batch(),
        };
        saver.save(
            &mut self.model,
            path,
            &self.history,
            self.control.lr_scale(),
        )
    }

    /// Put the state of a checkpoint written by [`Trainer::save_checkpoint`] back: model,
    /// optimizer, schedule, history, position. The trainer must have been built the same way
    /// (same model, optimizer kind, data); `run` then continues where the checkpoint was
    /// written. Nothing changes on an error.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        self.resume_state(RunState::load(path)?, &path.display().to_string())
    }

    /// [`Trainer::resume`] from a state already read (`source` names it in errors), for a
    /// caller that looked at its metadata first.
    pub fn resume_state(&mut self, state: RunState, source: &str) -> Result<()> {
        let source = source.to_string();
        let bad = |reason: String| Error::Data {
            file: source.clone(),
            reason,
        };
        let history: Vec<Record> = match state.meta.get("history") {
            Some(h) => {
                serde_json::from_str(h).map_err(|e| bad(format!("bad history metadata: {e}")))?
            }
            None => Vec::new(),
        };
        let mut next_batch: usize = state
            .meta
            .get("next_batch")
            .map(|v| v.parse())
            .transpose()
            .map_err(|_| bad("bad next_batch metadata".into()))?
            .unwrap_or(0);
        let saved_batch: usize = state
            .meta
            .get("global_batch")
            .map(|v| v.parse())
            .transpose()
            .map_err(|_| bad("bad global_batch metadata".into()))?
            .unwrap_or(self.global_batch());
        if next_batch > 0 && saved_batch != self.global_batch() {
            // Written with another number of ranks: the same place in the epoch by samples.
            let samples = next_batch * saved_batch;
            if !samples.is_multiple_of(self.global_batch()) {
                return Err(bad(format!(
                    "the run stopped after {samples} samples of an epoch (batch {saved_batch} \
                     over all ranks), which is not a whole number of this run's batches of \
                     {} (batch x ranks): resume it with ranks and batch that divide it, or \
                     from an epoch's end",
                    self.global_batch()
                )));
            }
            next_batch = samples / self.global_batch();
        }
        let partial = match state.meta.get("partial") {
            None => None,
            Some(p) => {
                let v: Vec<f64> = p
                    .split(',')
                    .map(|x| x.parse::<f64>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad(format!("bad partial metadata {p:?}")))?;
                if v.len() != 3 || v.iter().any(|x| !x.is_finite() || *x < 0.0) {
                    return Err(bad(format!("bad partial metadata {p:?}")));
                }
                Some([v[0], v[1], v[2]])
            }
        };
        let lr_scale: f64 = match state.meta.get("lr_scale") {
            None => 1.0,
            Some(v) => v
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| bad(format!("bad lr_scale metadata {v:?}")))?,
        };
        if state.meta.get("seed").map(String::as_str) != Some(&self.fit.seed.to_string()) {
            return Err(bad(format!(
                "the checkpoint was written by a run with seed {}, this run has seed {}",
                state.meta.get("seed").map_or("?", String::as_str),
                self.fit.seed
            )));
        }
        let per_epoch = self.batches_per_epoch();
        if next_batch >= per_epoch.max(1) {
            return Err(bad(format!(
                "next_batch {next_batch} is past the {per_epoch} batches of an epoch of this run"
            )));
        }
        let position = state.restore(
            &mut self.model,
            &mut self.optim,
            self.schedule.as_mut(),
            &source,
        )?;
        if history.len() != position.epochs_done {
            return Err(bad(format!(
                "the history holds {} epochs, the state {}",
                history.len(),
                position.epochs_done
            )));
        }
        self.history = history;
        self.position = (position.epochs_done, next_batch, partial);
        self.control = Control {
            stop: None,
            lr_scale: (lr_scale != 1.0).then_some(lr_scale),
        };
        Ok(())
    }

    /// Train from the current position to the last epoch, then test. Callbacks run in the
    /// order they were added.
    pub fn run(&mut self) -> Result<Outcome> {
        let start = Instant::now();
        self.stop.store(false, Ordering::SeqCst);
        for c in &mut self.callbacks {
            c.on_train_begin(&self.history, &mut self.control)?;
        }
        let (done, batch, partial) = self.position;
        let mut cfg = self.fit.clone();
        cfg.first_epoch = done + 1;
        cfg.first_batch = batch;
        cfg.partial = partial;
        let mut ending = Ending::Completed;
        if let Some(reason) = self.control.stopping() {
            // A callback stopped the run before its first epoch (early stopping resumed
            // after its patience ran out).
            ending = Ending::Stopped(reason.to_string());
        } else if done < cfg.epochs {
            let per_epoch = self.batches_per_epoch();
            let global_batch = self.global_batch();
            let mut hooks = TrainerHooks {
                callbacks: &mut self.callbacks,
                history: &mut self.history,
                control: &mut self.control,
                stop: &self.stop,
                has_val: self.validation.is_some(),
                meta: &self.meta,
                preprocess: self.preprocess.as_ref(),
                last_checkpoint: self.last_checkpoint.as_deref(),
                seed: cfg.seed,
                unit: cfg.unit,
                per_epoch,
                epochs: cfg.epochs,
                global_batch,
            };
            let ended = fit_with(
                &mut self.model,
                self.train.clone(),
                self.validation.as_ref(),
                &cfg,
                &mut self.optim,
                self.schedule.as_mut(),
                &mut hooks,
            )?;
            let last_epoch = self.history.last().map_or(done, |r| r.epoch);
            self.position = (last_epoch, 0, None);
            if let Some((epoch, next, sums)) = ended.interrupted {
                self.position = (epoch - 1, next, Some(sums));
                ending = Ending::Interrupted { epoch, batch: next };
            } else if let Some(reason) = self.control.stopping() {
                ending = Ending::Stopped(reason.to_string());
            } else if ended.interrupted_between_epochs {
                // The ranks' common decision (a rank's own flag may say otherwise: an
                // interrupt that reached one rank after the last exchange of an epoch).
                ending = Ending::Interrupted {
                    epoch: last_epoch + 1,
                    batch: 0,
                };
            }
            if matches!(ending, Ending::Interrupted { .. }) {
                if let Some(path) = self.last_checkpoint.clone() {
                    self.save_checkpoint(&path)?;
                }
            }
        }
        if !matches!(ending, Ending::Interrupted { .. }) {
            for c in &mut self.callbacks {
                c.on_train_end(&self.history, &mut self.model)?;
            }
        }
        // Rank 0's weights everywhere (a restored best epoch) before the sharded test.
        crate::dist::broadcast_model(&*crate::dist::world(), &mut self.model, true)?;
        let test = match (&self.test, &ending) {
            (_, Ending::Interrupted { .. }) => None,
            (Some(t), _) if !t.is_empty() => Some(evaluate(&mut self.model, t, 256, cfg.device)?),
            _ => None,
        };
        Ok(Outcome {
            ending,
            test,
            best: best_record(&self.history),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Whether epoch `epoch` (1-based, of `per_epoch` steps) ends a cycle of the learning rate: its
/// last step is a minimum of the schedule, the rate having fallen into it and rising after it
/// (the end of a cosine cycle before a warm restart, the bottom of a triangle), or the minimum
/// is the next epoch's first step (a per-batch triangle whose cycles are whole epochs). A rise after
/// nothing but rises or a flat start (a warmup) ends no cycle. Scaling the schedule (a
/// plateau's reductions) does not move its minima, so the schedule alone decides.
pub fn ends_cycle(
    schedule: &dyn crate::schedule::Schedule,
    unit: crate::schedule::Unit,
    per_epoch: usize,
    epoch: usize,
) -> bool {
    let lr = |step: usize| schedule.lr(unit.step(step, per_epoch)) as f64;
    let higher = |a: f64, b: f64| a > b * (1.0 + 1e-9);
    let last = (epoch * per_epoch).saturating_sub(1);
    // A minimum at the next epoch's first step (a triangle's bottom, per batch, with cycles
    // of whole epochs: the cycle starts there) ends this epoch too: its last step is the
    // bottom's neighbour.
    if unit == crate::schedule::Unit::Batch
        && per_epoch > 1
        && higher(lr(last), lr(last + 1))
        && higher(lr(last + 2), lr(last + 1))
    {
        return true;
    }
    if !higher(lr(last + 1), lr(last)) {
        return false;
    }
    // Back over a flat bottom to where the rate came from.
    let mut s = last;
    while s > 0 {
        let (before, here) = (lr(s - 1), lr(s));
        if higher(before, here) {
            return true;
        }
        if higher(here, before) {
            return false;
        }
        s -= 1;
    }
    false
}

/// The first step where a learning-rate cycle ends inside an epoch (a minimum of the schedule
/// that is neither an epoch's last step nor its first), within `epochs` epochs: snapshots, taken at epoch ends,
/// miss such a cycle. `None` when every cycle ends with an epoch.
pub fn cycle_end_inside_an_epoch(
    schedule: &dyn crate::schedule::Schedule,
    unit: crate::schedule::Unit,
    per_epoch: usize,
    epochs: usize,
) -> Option<usize> {
    if unit == crate::schedule::Unit::Epoch || per_epoch < 2 {
        return None;
    }
    let lr = |step: usize| schedule.lr(step) as f64;
    let higher = |a: f64, b: f64| a > b * (1.0 + 1e-9);
    let total = epochs * per_epoch;
    // Whether the rate has fallen since it last rose.
    let mut fallen = false;
    let mut prev = lr(0);
    for s in 1..total {
        let here = lr(s);
        if higher(prev, here) {
            fallen = true;
        } else if higher(here, prev) {
            // The minimum is step s - 1: fine at an epoch's last step or its first.
            if fallen && s % per_epoch != 0 && (s - 1) % per_epoch != 0 {
                return Some(s - 1);
            }
            fallen = false;
        }
        prev = here;
    }
    None
}

/// The record with the best validation accuracy (the earliest on ties), else the last.
pub fn best_record(history: &[Record]) -> Option<Record> {
    let mut best: Option<&Record> = None;
    for r in history {
        match (r.val_acc, best.and_then(|b| b.val_acc)) {
            (Some(a), Some(b)) if a > b => best = Some(r),
            (Some(_), None) if best.is_none() => best = Some(r),
            _ => {}
        }
    }
    best.or(history.last()).cloned()
}

struct TrainerHooks<'a> {
    callbacks: &'a mut Vec<Box<dyn Callback>>,
    history: &'a mut Vec<Record>,
    control: &'a mut Control,
    stop: &'a AtomicBool,
    has_val: bool,
    meta: &'a BTreeMap<String, String>,
    preprocess: Option<&'a Preprocessor>,
    last_checkpoint: Option<&'a Path>,
    seed: u64,
    unit: crate::schedule::Unit,
    per_epoch: usize,
    epochs: usize,
    global_batch: usize,
}

impl Hooks for TrainerHooks<'_> {
    fn epoch_begin(&mut self, epoch: usize) -> Result<()> {
        for c in self.callbacks.iter_mut() {
            c.on_epoch_begin(epoch, self.control)?;
        }
        Ok(())
    }
    fn step_begin(&mut self, epoch: usize, batch: usize) -> Result<()> {
        for c in self.callbacks.iter_mut() {
            c.on_step_begin(epoch, batch)?;
        }
        Ok(())
    }
    fn step_end(&mut self, step: &StepEnd) -> Result<()> {
        for c in self.callbacks.iter_mut() {
            c.on_step_end(step, self.control)?;
        }
        Ok(())
    }
    fn wants_step_values(&self, step: u64) -> bool {
        self.callbacks.iter().any(|c| c.wants_step_values(step))
    }
    fn epoch_end(
        &mut self,
        stats: &EpochStats,
        model: &mut dyn Layer,
        optim: &Optim,
        schedule: &dyn Schedule,
    ) -> Result<()> {
        let record = Record::from_stats(stats, self.has_val);
        self.history.push(record.clone());
        let saver = Saver {
            optim,
            schedule,
            seed: self.seed,
            position: (stats.epoch, 0, None),
            meta: self.meta,
            preprocess: self.preprocess,
            global_batch: self.global_batch,
        };
        let next_lr = (stats.epoch < self.epochs).then(|| {
            schedule.lr(self.unit.step(stats.epoch * self.per_epoch, self.per_epoch)) as f64
                * self.control.lr_scale()
        });
        // The run's last epoch ends its last cycle, unless the rate has just risen into it
        // (a warm restart at the end: the snapshot would be of a model at a peak rate).
        let rate_at_end = |epoch: usize| {
            schedule.lr(self
                .unit
                .step((epoch * self.per_epoch).saturating_sub(1), self.per_epoch))
                as f64
        };
        let just_rose = stats.epoch > 1
            && rate_at_end(stats.epoch) > rate_at_end(stats.epoch - 1) * (1.0 + 1e-9);
        let ends_cycle = (stats.epoch >= self.epochs && !just_rose)
            || ends_cycle(schedule, self.unit, self.per_epoch, stats.epoch);
        for c in self.callbacks.iter_mut() {
            let mut end = EpochEnd {
                record: &record,
                history: self.history,
                model,
                next_lr,
                ends_cycle,
                control: self.control,
                saver: &saver,
            };
            c.on_epoch_end(&mut end)?;
        }
        // The last checkpoint after the callbacks: it holds their changes (a new rate).
        if let Some(path) = self.last_checkpoint {
            saver.save(model, path, self.history, self.control.lr_scale())?;
        }
        Ok(())
    }
    fn lr_scale(&self) -> f64 {
        self.control.lr_scale()
    }
    fn stop_now(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn stop_after_epoch(&self) -> bool {
        self.control.stopping().is_some()
    }
}
