//! The callbacks regimen ships. Each rebuilds its state from the history of a resumed run in
//! `on_train_begin`, so that a resumed run decides as the uninterrupted one would.

use std::path::{Path, PathBuf};

use super::{Callback, Control, EpochEnd, Record};
use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::tensor::Tensor;

/// Whether a smaller or a larger metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Min,
    Max,
}

impl Mode {
    /// `min` for losses and the gap, `max` for accuracies.
    pub fn for_metric(metric: &str) -> Mode {
        if metric.ends_with("acc") {
            Mode::Max
        } else {
            Mode::Min
        }
    }
}

/// Tracks the best value of a metric: improved when better than the best by more than
/// `min_delta` (absolute), as Keras' `EarlyStopping`.
#[derive(Clone, Debug)]
struct Best {
    metric: String,
    mode: Mode,
    min_delta: f64,
    value: Option<f64>,
    epoch: usize,
}

impl Best {
    fn new(metric: &str, mode: Mode, min_delta: f64) -> Result<Best> {
        if !super::Record::METRICS.contains(&metric) {
            return Err(Error::config(
                "metric",
                metric,
                &format!("expected one of {}", super::Record::METRICS.join(", ")),
            ));
        }
        if !(min_delta >= 0.0 && min_delta.is_finite()) {
            return Err(Error::config(
                "min_delta",
                min_delta,
                "must be a finite number >= 0",
            ));
        }
        Ok(Best {
            metric: metric.to_string(),
            mode,
            min_delta,
            value: None,
            epoch: 0,
        })
    }

    /// Observe a record; true if it is the new best. A record without the metric (no
    /// validation split) is an error naming the metric.
    fn observe(&mut self, r: &Record) -> Result<bool> {
        let v = r.metric(&self.metric).ok_or_else(|| {
            Error::config(
                "metric",
                &self.metric,
                "is not measured in this run (val_* metrics need a validation split)",
            )
        })?;
        let better = match self.value {
            None => v.is_finite(),
            Some(b) => match self.mode {
                Mode::Min => v < b - self.min_delta,
                Mode::Max => v > b + self.min_delta,
            },
        };
        if better {
            self.value = Some(v);
            self.epoch = r.epoch;
        }
        Ok(better)
    }
}

/// The record of `history` that [`BestCheckpoint`] and [`EarlyStopping`] with these settings
/// hold as the best (the earliest on ties); records without the metric are skipped.
pub fn best_record_by<'a>(
    history: &'a [Record],
    metric: &str,
    mode: Mode,
    min_delta: f64,
) -> Result<Option<&'a Record>> {
    let mut best = Best::new(metric, mode, min_delta)?;
    let mut at = None;
    for r in history.iter().filter(|r| r.metric(metric).is_some()) {
        if best.observe(r)? {
            at = Some(r);
        }
    }
    Ok(at)
}

/// Stop when `metric` has not improved by more than `min_delta` for `patience` epochs; with
/// `restore_best`, put back the weights of the best epoch at the end of the run (kept as
/// device copies, no file).
pub struct EarlyStopping {
    best: Best,
    patience: usize,
    restore_best: bool,
    /// Epochs since the best.
    wait: usize,
    weights: Vec<Tensor>,
    /// The epoch whose weights `weights` holds.
    weights_epoch: usize,
    /// Also write the best epoch to this checkpoint, so that a resumed run can restore an
    /// epoch from before the resume.
    file: Option<PathBuf>,
}

impl EarlyStopping {
    pub fn new(metric: &str, mode: Mode, patience: usize, min_delta: f64) -> Result<Self> {
        Ok(EarlyStopping {
            best: Best::new(metric, mode, min_delta)?,
            patience,
            restore_best: false,
            wait: 0,
            weights: Vec::new(),
            weights_epoch: 0,
            file: None,
        })
    }

    pub fn restore_best_weights(mut self) -> Self {
        self.restore_best = true;
        self
    }

    /// With [`EarlyStopping::restore_best_weights`]: also keep the best epoch in the checkpoint
    /// `path`, from which a resumed run restores a best epoch it did not see itself.
    pub fn best_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// The best epoch and its value so far.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best.value.map(|v| (self.best.epoch, v))
    }

    /// The decision after one more epoch: whether it improved on the best, and the reason to
    /// stop when `patience` epochs have passed without improvement.
    pub fn observe(&mut self, record: &Record) -> Result<(bool, Option<String>)> {
        if self.best.observe(record)? {
            self.wait = 0;
            return Ok((true, None));
        }
        self.wait += 1;
        let stop = (self.wait >= self.patience).then(|| {
            format!(
                "early stopping: {} has not improved for {} epochs (best {:.4} at epoch {})",
                self.best.metric,
                self.wait,
                self.best.value.unwrap_or(f64::NAN),
                self.best.epoch
            )
        });
        Ok((false, stop))
    }
}

/// Copy every parameter and buffer into buffers of their own (kept from call to call): the
/// model's own buffers are not touched, so a recorded graph keeps its pointers.
fn copy_state(model: &mut dyn Layer, into: &mut Vec<Tensor>) {
    let mut i = 0;
    let mut save = |t: &Tensor| {
        let be = t.backend();
        if i == into.len() {
            into.push(be.alloc(t.shape(), t.dtype()));
        }
        be.copy(t, &mut into[i]);
        i += 1;
    };
    model.visit_params_unnamed(&mut |p| save(&p.value));
    model.visit_buffers("", &mut |_, b| save(b));
}

fn put_state(model: &mut dyn Layer, from: &[Tensor]) {
    let mut i = 0;
    let mut put = |t: &mut Tensor| {
        t.backend().copy(&from[i], t);
        i += 1;
    };
    model.visit_params_unnamed(&mut |p| put(&mut p.value));
    model.visit_buffers("", &mut |_, b| put(b));
}

impl Callback for EarlyStopping {
    fn on_train_begin(&mut self, history: &[Record], control: &mut Control) -> Result<()> {
        // The history is the whole truth: a second `run` of the same trainer replays it
        // again rather than counting its epochs twice.
        self.best.value = None;
        self.best.epoch = 0;
        self.wait = 0;
        let mut stop = None;
        for r in history {
            stop = self.observe(r)?.1;
        }
        // A resumed run whose patience ran out before the resume stopped there: it trains no
        // further epoch.
        if let Some(reason) = stop {
            control.stop(reason);
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<()> {
        let (improved, stop) = self.observe(end.record)?;
        if improved && self.restore_best {
            copy_state(end.model, &mut self.weights);
            self.weights_epoch = end.record.epoch;
            if let Some(f) = &self.file {
                end.save_checkpoint(f)?;
            }
        }
        if let Some(reason) = stop {
            end.control.stop(reason);
        }
        Ok(())
    }

    fn on_train_end(&mut self, _history: &[Record], model: &mut dyn Layer) -> Result<()> {
        if !self.restore_best || self.best.value.is_none() {
            return Ok(());
        }
        if !self.weights.is_empty() && self.weights_epoch == self.best.epoch {
            put_state(model, &self.weights);
        } else if let Some(f) = self.file.as_ref().filter(|f| f.is_file()) {
            // The best epoch came before a resume: its checkpoint holds it.
            crate::checkpoint::load(f, model)?;
        } else {
            return Err(Error::config(
                "restore_best",
                self.best.epoch,
                "the best epoch's weights are neither in memory (it came before a resume) nor in a best_file",
            ));
        }
        Ok(())
    }
}

/// Write a checkpoint of the run to `path` whenever `metric` reaches a new best (the
/// `best` checkpoint of a run folder).
pub struct BestCheckpoint {
    best: Best,
    path: PathBuf,
}

impl BestCheckpoint {
    pub fn new(path: impl Into<PathBuf>, metric: &str, mode: Mode) -> Result<Self> {
        Ok(BestCheckpoint {
            best: Best::new(metric, mode, 0.0)?,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Count only improvements by more than `min_delta` (as [`EarlyStopping`] does, so that
    /// both pick the same best epoch).
    pub fn with_min_delta(mut self, min_delta: f64) -> Result<Self> {
        self.best = Best::new(&self.best.metric, self.best.mode, min_delta)?;
        Ok(self)
    }

    /// The best epoch and its value so far.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best.value.map(|v| (self.best.epoch, v))
    }
}

impl Callback for BestCheckpoint {
    fn on_train_begin(&mut self, history: &[Record], _control: &mut Control) -> Result<()> {
        for r in history {
            self.best.observe(r)?;
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<()> {
        if self.best.observe(end.record)? {
            end.save_checkpoint(&self.path)?;
        }
        Ok(())
    }
}

/// Snapshot ensembles (Huang et al., "Snapshot Ensembles: Train 1, get M for free", 2017):
/// a checkpoint at the end of each cycle of a cyclic or warm-restart schedule, where the
/// learning rate is at its lowest and the model at a local minimum. A cycle ends at an epoch
/// whose last step is a minimum of the schedule ([`super::ends_cycle`]: the rate fell into it
/// and rises after it; a warmup's rise ends nothing); the last epoch of the run ends the last
/// cycle, unless the rate rose into it (a restart that began at the end gets no snapshot). A cycle that ends inside an epoch gets no snapshot
/// ([`super::cycle_end_inside_an_epoch`] finds such a schedule before the run). Snapshots are `DIR/snapshot-epoch-E.safetensors`; evaluate them
/// together with [`crate::ensemble`].
pub struct SnapshotEnsemble {
    dir: PathBuf,
    written: Vec<PathBuf>,
}

impl SnapshotEnsemble {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SnapshotEnsemble {
            dir: dir.into(),
            written: Vec::new(),
        }
    }

    /// The snapshot file of `epoch`.
    pub fn path_for(dir: &Path, epoch: usize) -> PathBuf {
        dir.join(format!("snapshot-epoch-{epoch}.safetensors"))
    }

    /// The snapshots written by this run so far (a resumed run lists the earlier ones too).
    pub fn snapshots(&self) -> &[PathBuf] {
        &self.written
    }
}

impl Callback for SnapshotEnsemble {
    fn on_train_begin(&mut self, history: &[Record], _control: &mut Control) -> Result<()> {
        for r in history {
            let p = Self::path_for(&self.dir, r.epoch);
            if p.is_file() {
                self.written.push(p);
            }
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<()> {
        if end.ends_cycle {
            std::fs::create_dir_all(&self.dir).map_err(|e| Error::Io {
                context: format!("creating {}", self.dir.display()),
                source: e,
            })?;
            let p = Self::path_for(&self.dir, end.record.epoch);
            end.save_checkpoint(&p)?;
            self.written.push(p);
        }
        Ok(())
    }
}

/// `metrics.csv`: a header and one row per epoch, rewritten whole (atomically) after each
/// epoch, so that the file always holds complete rows, also after a crash or a resume.
pub struct MetricsCsv {
    path: PathBuf,
}

impl MetricsCsv {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MetricsCsv { path: path.into() }
    }

    pub const HEADER: &'static str =
        "epoch,step,train_loss,train_acc,val_loss,val_acc,gap,lr,samples_per_sec,seconds";

    /// The CSV text of a history.
    pub fn render(history: &[Record]) -> String {
        let opt = |v: Option<f32>| v.map_or(String::new(), |v| v.to_string());
        let mut s = String::from(Self::HEADER);
        s.push('\n');
        for r in history {
            s += &format!(
                "{},{},{},{},{},{},{},{},{:.1},{:.3}\n",
                r.epoch,
                r.step,
                r.train_loss,
                r.train_acc,
                opt(r.val_loss),
                opt(r.val_acc),
                opt(r.gap),
                r.lr as f32,
                r.samples_per_sec,
                r.seconds
            );
        }
        s
    }
}

impl Callback for MetricsCsv {
    fn on_train_begin(&mut self, history: &[Record], _control: &mut Control) -> Result<()> {
        crate::io::write_atomic(&self.path, Self::render(history).as_bytes())
    }
    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<()> {
        crate::io::write_atomic(&self.path, Self::render(end.history).as_bytes())
    }
}
