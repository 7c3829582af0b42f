//! The training loop: mini-batches of a [`Dataset`], any optimizer and schedule, an optional
//! weight penalty, per-epoch loss and accuracy. (Callbacks, checkpoints and the run folder of
//! the full trainer build on the same step.)
//!
//! One step: `forward(x, Train)` -> fused softmax cross-entropy -> `backward(dlogits)` ->
//! penalty gradients -> `optim.step(model, schedule.lr(t))` (which zeroes the gradients). The
//! loss and the correct count of each batch are accumulated on the device and read once per
//! epoch. A [`ReduceOnPlateau`](crate::schedule::ReduceOnPlateau) schedule observes the
//! held-out loss after each epoch.

use std::time::Instant;

use crate::backend::Target;
use std::sync::Arc;

use crate::data::{Dataset, Loader, Pipeline};
use crate::dist::{Comm, Reducer};
use crate::error::{Error, Result};
use crate::layer::{Ctx, Layer, Precision};
use crate::loss::{CrossEntropy, Penalty};
use crate::optim::{Optim, OptimConfig, Sgd};
use crate::schedule::{Constant, Schedule, Unit};
use crate::tensor::{DType, Device, Indices, Tensor};

#[derive(Clone, Debug)]
pub struct SgdConfig {
    pub epochs: usize,
    /// Samples per step: the dataset size for batch gradient descent, 1 for stochastic.
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
    pub device: Device,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            epochs: 10,
            batch_size: 32,
            lr: 0.1,
            seed: 0,
            device: Device::Cpu,
        }
    }
}

impl SgdConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config(
                "batch_size",
                self.batch_size,
                "must be at least 1",
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config(
                "lr",
                self.lr,
                "the learning rate must be a finite number > 0",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f32,
    pub train_acc: f32,
    pub test_loss: f32,
    pub test_acc: f32,
    /// The learning rate of the epoch's last step.
    pub lr: f32,
    pub seconds: f32,
    /// Training samples seen this epoch (fewer than the training set after a mid-epoch resume).
    pub samples: usize,
    /// Optimizer updates done since the start of the run, at the end of the epoch.
    pub steps: u64,
}

/// Running sums of loss and correct predictions, kept on the device.
struct Meter {
    loss: Tensor,
    correct: Tensor,
    n: usize,
}

impl Meter {
    fn new(device: Device) -> Meter {
        Meter {
            loss: Tensor::zeros(&[1], device),
            correct: Tensor::zeros(&[1], device),
            n: 0,
        }
    }
    fn add(&mut self, logits: &Tensor, loss: &Tensor, labels: &crate::Indices) {
        let be = logits.backend();
        let b = logits.shape()[0];
        be.axpy(b as f32, loss, &mut self.loss);
        let c = be.count_correct(logits, labels);
        be.axpy(1.0, &c, &mut self.correct);
        self.n += b;
    }
    /// (mean loss, accuracy): the one read back to the host.
    fn read(&self) -> (f32, f32) {
        let n = self.n.max(1) as f32;
        (self.loss.item() / n, self.correct.item() / n)
    }
    /// `[loss sum, correct, samples]` over every data-parallel rank (one read, one all-reduce).
    fn sums(&self, comm: &dyn Comm) -> Result<[f64; 3]> {
        let local = vec![
            self.loss.item() as f64,
            self.correct.item() as f64,
            self.n as f64,
        ];
        let s = if comm.size() > 1 {
            comm.sum_f64(local)?
        } else {
            local
        };
        Ok([s[0], s[1], s[2]])
    }
    /// (mean loss, accuracy, samples) over every rank.
    fn read_all(&self, comm: &dyn Comm) -> Result<(f32, f32, usize)> {
        if comm.size() == 1 {
            let (l, a) = self.read();
            return Ok((l, a, self.n));
        }
        let [l, c, n] = self.sums(comm)?;
        Ok(((l / n.max(1.0)) as f32, (c / n.max(1.0)) as f32, n as usize))
    }
}

/// Mean cross-entropy and accuracy of `model` on `data` in evaluation mode. In data-parallel
/// training ([`crate::dist`]) every rank evaluates its shard and the sums are added up: every
/// rank must call it.
pub fn evaluate(
    model: &mut dyn Layer,
    data: &Dataset,
    batch_size: usize,
    device: Device,
) -> Result<(f32, f32)> {
    let ce = CrossEntropy::new();
    let mut meter = Meter::new(device);
    let comm = crate::dist::world();
    let idx: Vec<usize> = crate::dist::shard(data.len(), comm.rank(), comm.size()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk, device)?;
        let logits = model.forward(&x, &Ctx::eval())?;
        let out = ce.forward(&logits, Target::Hard(&y))?;
        meter.add(&logits, &out.loss, &y);
    }
    let (loss, acc, _) = meter.read_all(&*comm)?;
    Ok((loss, acc))
}

/// How to run the loop (the optimizer and the schedule are passed separately).
#[derive(Clone, Debug)]
pub struct FitConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub device: Device,
    /// Whether the schedule steps per batch or per epoch.
    pub unit: Unit,
    /// A weight penalty added to the loss (its gradient to the weights').
    pub penalty: Option<Penalty>,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f32,
    /// Augmentation of the training batches.
    pub augment: Pipeline,
    /// Background threads preparing batches (0: in the training thread).
    pub workers: usize,
    /// Report progress on stderr during an epoch that runs longer than a couple of seconds.
    pub progress: bool,
    /// The element type of matrix products (mixed precision).
    pub precision: Precision,
    /// Keep the training set on the device and build each batch there (a gather kernel with a
    /// leading crop and flip, then one kernel per later augmentation): no per-batch copy from
    /// the host. One process only.
    pub device_data: bool,
    /// Record one training step as a graph and replay it for every full batch (CUDA; implies
    /// `device_data`). The learning rate schedule is uploaded as a table.
    pub graph: bool,
    /// The epoch to start from (1-based): a run resumed from a [`crate::RunState`] saved after
    /// epoch `e` continues with `first_epoch = e + 1`.
    pub first_epoch: usize,
    /// The batch of `first_epoch` to start from (0-based): a run stopped in the middle of an
    /// epoch continues with the next batch.
    pub first_batch: usize,
    /// The training loss and correct-count sums of the batches of `first_epoch` before
    /// `first_batch` (`[loss sum, correct, samples]`), so that a resumed epoch reports the
    /// same training figures as an uninterrupted one.
    pub partial: Option<[f64; 3]>,
    /// Data-parallel training ([`crate::dist`]): the gradients are summed over the ranks in
    /// buckets of about this many bytes, each sent as soon as backward has filled it.
    pub bucket_bytes: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            epochs: 10,
            batch_size: 32,
            seed: 0,
            device: Device::Cpu,
            unit: Unit::Batch,
            penalty: None,
            label_smoothing: 0.0,
            augment: Pipeline::default(),
            workers: 1,
            progress: false,
            precision: Precision::F32,
            device_data: false,
            graph: false,
            first_epoch: 1,
            first_batch: 0,
            partial: None,
            bucket_bytes: 1 << 20,
        }
    }
}

/// What a training loop tells an observer between steps, and what the observer may change:
/// the bridge from the loop to [`crate::trainer::Callback`]s.
pub trait Hooks {
    /// Before the first step of `epoch` (1-based).
    fn epoch_begin(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }
    /// Before every step: batch `batch` (0-based) of `epoch`.
    fn step_begin(&mut self, _epoch: usize, _batch: usize) -> Result<()> {
        Ok(())
    }
    /// After every step. The loss and the gradient norm are read from the device only for
    /// the steps [`Hooks::wants_step_values`] asks for, and only by the host loop.
    fn step_end(&mut self, _step: &StepEnd) -> Result<()> {
        Ok(())
    }
    /// After each epoch, with its statistics; the model, the optimizer and the schedule are
    /// in their end-of-epoch state (a checkpoint written now resumes at the next epoch).
    fn epoch_end(
        &mut self,
        _stats: &EpochStats,
        _model: &mut dyn Layer,
        _optim: &Optim,
        _schedule: &dyn Schedule,
    ) -> Result<()> {
        Ok(())
    }
    /// A factor on the schedule's learning rate (a callback's change of the rate). The host
    /// loop reads it before every step, the device loop before every epoch.
    fn lr_scale(&self) -> f64 {
        1.0
    }
    /// Stop after the current step (an interrupt); checked after every step.
    fn stop_now(&self) -> bool {
        false
    }
    /// Stop at the end of this epoch (early stopping); checked after `epoch_end`.
    fn stop_after_epoch(&self) -> bool {
        false
    }
    /// Whether `step_end` of optimizer update `step` (1-based) wants the loss and the
    /// gradient norm (each a device read).
    fn wants_step_values(&self, _step: u64) -> bool {
        false
    }
}

/// One finished step, as [`Hooks::step_end`] sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepEnd {
    pub epoch: usize,
    /// The batch within the epoch (0-based).
    pub batch: usize,
    /// Optimizer updates since the start of the run.
    pub step: u64,
    pub lr: f64,
    /// The batch's mean loss, when asked for.
    pub loss: Option<f32>,
    /// The global gradient norm before clipping, when asked for.
    pub grad_norm: Option<f32>,
}

/// How a training loop ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub history: Vec<EpochStats>,
    /// Set when [`Hooks::stop_now`] stopped the loop inside an epoch: the epoch, the next
    /// batch to train, and the partial sums ([`FitConfig::partial`]) to resume with.
    pub interrupted: Option<(usize, usize, [f64; 3])>,
    /// Set when an interrupt stopped the loop at an epoch's end (before the last epoch): on
    /// several ranks, the decision they all took together, which a rank's own flag is not.
    pub interrupted_between_epochs: bool,
}

struct NoHooks<F: FnMut(&EpochStats)>(F);

impl<F: FnMut(&EpochStats)> Hooks for NoHooks<F> {
    fn epoch_end(
        &mut self,
        stats: &EpochStats,
        _model: &mut dyn Layer,
        _optim: &Optim,
        _schedule: &dyn Schedule,
    ) -> Result<()> {
        (self.0)(stats);
        Ok(())
    }
}

/// Train `model`; `on_epoch` sees each epoch's statistics as they come. `test` is the held-out
/// set evaluated after each epoch, and the loss a [`ReduceOnPlateau`](crate::schedule::ReduceOnPlateau)
/// schedule observes: give it a validation split, not the final test set, when the schedule
/// decides on it (`regimen train` does). The input gradient is switched off during training
/// and on again after. The reported training
/// loss is the data loss (without the penalty) on the augmented batches, against the mixed
/// labels under Mixup/CutMix; the training accuracy counts the original label of each sample.
pub fn fit(
    model: &mut dyn Layer,
    train: Arc<Dataset>,
    test: &Dataset,
    cfg: &FitConfig,
    optim: &mut Optim,
    schedule: &mut dyn Schedule,
    on_epoch: impl FnMut(&EpochStats),
) -> Result<Vec<EpochStats>> {
    let mut hooks = NoHooks(on_epoch);
    Ok(fit_with(model, train, Some(test), cfg, optim, schedule, &mut hooks)?.history)
}

/// [`fit`] with an optional held-out set (its loss and accuracy are NaN in the statistics
/// without one) and [`Hooks`] that observe every step and epoch and may stop the run or scale
/// its learning rate.
pub fn fit_with(
    model: &mut dyn Layer,
    train: Arc<Dataset>,
    held_out: Option<&Dataset>,
    cfg: &FitConfig,
    optim: &mut Optim,
    schedule: &mut dyn Schedule,
    hooks: &mut dyn Hooks,
) -> Result<Ended> {
    if cfg.batch_size == 0 {
        return Err(Error::config("batch_size", 0, "must be at least 1"));
    }
    if train.is_empty() {
        return Err(Error::config(
            "training set",
            "empty",
            "needs at least one sample",
        ));
    }
    train.validate()?;
    cfg.augment.check_image_shape(train.image_shape)?;
    let ce = CrossEntropy::with_label_smoothing(cfg.label_smoothing)?;
    let classes = train.num_classes();
    let comm = crate::dist::world();
    let ranks = comm.size();
    if ranks > 1 {
        start_data_parallel(&*comm, model, &train, cfg)?;
    }
    // In data-parallel training the loader's batch is the global batch, of which it gives
    // this rank its part.
    let loader = Loader {
        pipeline: Arc::new(cfg.augment.clone()),
        workers: cfg.workers,
        shard: (comm.rank(), ranks),
        ..Loader::new(train, cfg.batch_size * ranks, cfg.seed)
    };
    if cfg.first_batch >= loader.batches_per_epoch().max(1) {
        return Err(Error::config(
            "first_batch",
            cfg.first_batch,
            &format!("an epoch has {} batches", loader.batches_per_epoch()),
        ));
    }
    // Nothing uses the gradient of the input images; restored when training ends, however.
    model.set_input_grad(false);
    let result = if cfg.device_data || cfg.graph {
        run_epochs_on_device(
            model,
            &loader.data,
            held_out,
            cfg,
            optim,
            schedule,
            &ce,
            hooks,
        )
    } else {
        run_epochs(
            model, held_out, cfg, optim, schedule, &loader, &ce, classes, hooks,
        )
    };
    model.set_input_grad(true);
    result
}

/// Checks and state before the first step of a data-parallel run: the same setup on every
/// rank (config, model shapes, data: a hash compared across the ranks), and rank 0's
/// parameters and buffers everywhere.
fn start_data_parallel(
    comm: &dyn Comm,
    model: &mut dyn Layer,
    train: &Dataset,
    cfg: &FitConfig,
) -> Result<()> {
    if cfg.device_data || cfg.graph {
        return Err(Error::Distributed(
            "batches built on the device (a GPU run's default, --graph) are for one process: \
             give --host-data"
                .into(),
        ));
    }
    if cfg.batch_size * comm.size() > train.len() {
        return Err(Error::config(
            "batch_size",
            cfg.batch_size,
            &format!(
                "{} ranks of {} make a global batch larger than the {} training samples",
                comm.size(),
                cfg.batch_size,
                train.len()
            ),
        ));
    }
    // Every field that shapes the run; not the worker threads (a per-rank choice).
    let mut setup = format!(
        "{:?}|{:?}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{}",
        cfg.epochs,
        cfg.batch_size,
        cfg.seed,
        cfg.unit,
        cfg.penalty,
        cfg.label_smoothing,
        cfg.augment.steps,
        cfg.first_epoch * 1_000_003 + cfg.first_batch,
        cfg.precision,
        model.describe(),
    )
    .into_bytes();
    model.visit_params("", &mut |name, p| {
        setup.extend(format!("|{name}{:?}", p.value.shape()).bytes())
    });
    check_same(comm, "training setup", &setup)?;
    let mut data = Vec::with_capacity(train.images.len() * 4 + train.labels.len() * 4);
    data.extend(train.images.iter().flat_map(|v| v.to_le_bytes()));
    data.extend(train.labels.iter().flat_map(|v| v.to_le_bytes()));
    check_same(comm, "training data", &data)?;
    crate::dist::broadcast_model(comm, model, true)
}

use crate::dist::check_same;

/// Held-out loss and accuracy, NaN without a held-out set.
fn held_out_figures(
    model: &mut dyn Layer,
    held_out: Option<&Dataset>,
    device: Device,
) -> Result<(f32, f32)> {
    match held_out {
        Some(d) if !d.is_empty() => evaluate(model, d, 256, device),
        _ => Ok((f32::NAN, f32::NAN)),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_epochs(
    model: &mut dyn Layer,
    held_out: Option<&Dataset>,
    cfg: &FitConfig,
    optim: &mut Optim,
    schedule: &mut dyn Schedule,
    loader: &Loader,
    ce: &CrossEntropy,
    classes: usize,
    hooks: &mut dyn Hooks,
) -> Result<Ended> {
    let per_epoch = loader.batches_per_epoch();
    let mut history = Vec::with_capacity(cfg.epochs);
    let first = cfg.first_epoch.max(1);
    let mut batch_index = (first - 1) * per_epoch + cfg.first_batch;
    let mut guard = Guard::new(cfg.device);
    let comm = crate::dist::world();
    let (rank, ranks) = (comm.rank(), comm.size());
    let mut reducer = (ranks > 1).then(|| Reducer::new(comm.clone(), cfg.bucket_bytes));
    // Whether every rank agreed to stop (an interrupt on any rank stops them all).
    let mut stopping = false;
    for epoch in first..=cfg.epochs {
        let start = Instant::now();
        guard.begin_epoch(model);
        hooks.epoch_begin(epoch)?;
        let mut meter = Meter::new(cfg.device);
        let start_batch = if epoch == first { cfg.first_batch } else { 0 };
        // A resumed epoch's partial sums are the whole world's: rank 0 carries them.
        if let (Some([loss, correct, n]), true, 0) = (cfg.partial, epoch == first, rank) {
            be_write_scalar(&mut meter.loss, loss as f32);
            be_write_scalar(&mut meter.correct, correct as f32);
            meter.n = n as usize;
        }
        let mut lr = 0.0f32;
        let mut last_report = Instant::now();
        for (i, batch) in loader.epoch_from(epoch - 1, start_batch).enumerate() {
            let b = start_batch + i;
            if cfg.progress && last_report.elapsed().as_secs_f32() > 2.0 {
                report_progress(epoch, cfg.epochs, b, per_epoch, start);
                last_report = Instant::now();
            }
            hooks.step_begin(epoch, b)?;
            let x = Tensor::from_host(&batch.shape, batch.images, cfg.device)?;
            let y = Indices::from_vec(batch.labels).to_device(cfg.device);
            // The optimizer's step counter keys this step's random draws. The context is
            // dropped before the update increments the counter (no second owner, no copy).
            // This rank's part of the global batch.
            let share = batch.shape[0] as f32 / loader.global_len(b) as f32;
            let logits = {
                // Micro-batches of one accumulated update share its step: the micro index
                // tells their random draws apart.
                let ctx = Ctx::train()
                    .at_step(optim.step_counter(cfg.device))
                    .at_micro(optim.pending_micro())
                    .with_precision(cfg.precision)
                    .on_rank(rank, share);
                // (f32 for the loss: a model that is not a Sequential may hand on bf16.)
                model.forward(&x, &ctx)?.to_dtype(DType::F32)
            };
            let out = match batch.soft {
                Some(soft) => ce.forward(
                    &logits,
                    Target::Soft(&Tensor::from_host(
                        &[batch.shape[0], classes],
                        soft,
                        cfg.device,
                    )?),
                )?,
                None => ce.forward(&logits, Target::Hard(&y))?,
            };
            guard.note(&out.loss, optim.step_counter(cfg.device));
            match &mut reducer {
                None => drop(model.backward(&out.grad)?),
                Some(r) => {
                    // Gradients summed over the ranks, each weighed by its share: every rank
                    // then holds the global batch's gradient. The stop flags ride along.
                    let stop = [f32::from(u8::from(hooks.stop_now()))];
                    let flags = r.backward(model, &out.grad, share, &stop)?;
                    stopping = flags[0] > 0.0;
                }
            }
            if let Some(p) = &cfg.penalty {
                p.apply(model);
            }
            let scale = hooks.lr_scale();
            lr = (schedule.lr(cfg.unit.step(batch_index, per_epoch)) as f64 * scale) as f32;
            let wants = hooks.wants_step_values(optim.steps() + 1);
            if wants {
                optim.measure_grad_norm();
            }
            let info = optim.step(model, lr)?;
            meter.add(&logits, &out.loss, &y);
            batch_index += 1;
            hooks.step_end(&StepEnd {
                epoch,
                batch: b,
                step: optim.steps(),
                lr: lr as f64,
                loss: wants.then(|| out.loss.item()),
                grad_norm: if wants {
                    info.grad_norm.map(|t| t.item())
                } else {
                    None
                },
            })?;
            if reducer.is_none() {
                stopping = hooks.stop_now();
            }
            if stopping && b + 1 < per_epoch {
                if cfg.progress {
                    clear_progress();
                }
                guard.end_epoch(model, epoch, optim.steps())?;
                let partial = meter.sums(&*comm)?;
                if ranks > 1 {
                    crate::dist::broadcast_model(&*comm, model, false)?;
                }
                return Ok(Ended {
                    history,
                    interrupted: Some((epoch, b + 1, partial)),
                    interrupted_between_epochs: false,
                });
            }
        }
        if cfg.progress && start.elapsed().as_secs_f32() > 2.0 {
            clear_progress();
        }
        let (train_loss, train_acc, samples) = meter.read_all(&*comm)?;
        guard.end_epoch(model, epoch, optim.steps())?;
        if ranks > 1 {
            // Rank 0's running statistics everywhere (what is evaluated and saved).
            crate::dist::broadcast_model(&*comm, model, false)?;
        }
        let (test_loss, test_acc) = held_out_figures(model, held_out, cfg.device)?;
        if held_out.is_some() {
            guard.check_held_out(model, epoch, optim.steps(), test_loss)?;
            schedule.observe(test_loss);
        }
        let stats = EpochStats {
            epoch,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            lr,
            seconds: start.elapsed().as_secs_f32(),
            samples: samples
                - if epoch == first {
                    cfg.partial.map_or(0, |p| p[2] as usize)
                } else {
                    0
                },
            steps: optim.steps(),
        };
        hooks.epoch_end(&stats, model, optim, schedule)?;
        history.push(stats);
        let stop_now = if ranks > 1 {
            stopping
        } else {
            hooks.stop_now()
        };
        if stop_now && epoch < cfg.epochs {
            return Ok(Ended {
                history,
                interrupted: None,
                interrupted_between_epochs: true,
            });
        }
        if hooks.stop_after_epoch() {
            break;
        }
    }
    Ok(Ended {
        history,
        interrupted: None,
        interrupted_between_epochs: false,
    })
}

/// Overwrite a one-element device tensor with `v`.
fn be_write_scalar(t: &mut Tensor, v: f32) {
    let be = t.backend();
    be.write(t, crate::backend::HostBuf::F32(vec![v]));
}

/// The training loop with the data on the device: the training set is uploaded once; each
/// epoch uploads its shuffled order (the same order as the host [`Loader`]); each step
/// gathers its batch (with a leading crop and flip) and runs one batch step per later
/// augmentation ([`Pipeline::device_plan`](crate::data::Pipeline::device_plan)), reading a
/// batch cursor that the step itself advances; loss and correct counts accumulate on the
/// device. With `cfg.graph` the
/// third step is recorded as a graph (after two eager steps, the buffer pool holds everything
/// a step needs), and every later full batch is one replay of it.
#[allow(clippy::too_many_arguments)]
fn run_epochs_on_device(
    model: &mut dyn Layer,
    train: &Dataset,
    held_out: Option<&Dataset>,
    cfg: &FitConfig,
    optim: &mut Optim,
    schedule: &mut dyn Schedule,
    ce: &CrossEntropy,
    hooks: &mut dyn Hooks,
) -> Result<Ended> {
    use crate::backend::RandomKey;
    use crate::tensor::DType;
    let plan = cfg.augment.device_plan();
    let (pad, flip_p) = (plan.pad, plan.flip_p);
    let device = cfg.device;
    if cfg.graph && device == Device::Cpu {
        return Err(Error::config(
            "graph",
            true,
            "recording a training step needs a CUDA device",
        ));
    }
    let be = device.backend();
    let (n, bsz) = (train.len(), cfg.batch_size);
    let [c, h, w] = train.image_shape;
    let per_epoch = n.div_ceil(bsz);
    let (full, rem) = (n / bsz, n % bsz);
    let images = Tensor::from_host(&[n, c, h, w], train.images.clone(), device)?;
    let labels = Indices::from_host(train.labels.clone(), device);
    let classes = train.num_classes() as u64;
    let order = Indices::zeros(n, device);
    let cursor = Indices::zeros(1, device);
    let x_full = be.alloc(&[bsz, c, h, w], DType::F32);
    let y_full = Indices::from_tensor(be.zeros(&[bsz], DType::U32), classes);
    let x_rem = be.alloc(&[rem.max(1), c, h, w], DType::F32);
    let y_rem = Indices::from_tensor(be.zeros(&[rem.max(1)], DType::U32), classes);
    // Soft labels, when a step mixes samples.
    let soft = |rows: usize| {
        plan.mixes()
            .then(|| be.zeros(&[rows, classes as usize], DType::F32))
    };
    let (soft_full, soft_rem) = (soft(bsz), soft(rem.max(1)));
    let loss_sum = Tensor::zeros(&[1], device);
    let correct_sum = Tensor::zeros(&[1], device);
    let stream = crate::rng::mix64(cfg.seed ^ 0xA06_A06);
    if optim.config().accumulate > 1 {
        return Err(Error::config(
            "accumulate",
            optim.config().accumulate,
            "batches built on the device take one update per batch; train with the host loader \
             to accumulate gradients",
        ));
    }
    // Update u (0-based, the device step counter minus one) trains on batch
    // u - first_update + first_batch of the run.
    let first = cfg.first_epoch.max(1);
    let first_update = optim.steps() as usize;
    let first_batch = (first - 1) * per_epoch + cfg.first_batch;
    let batch_of = move |u: usize| u.saturating_sub(first_update) + first_batch;
    let lr_table = |schedule: &dyn Schedule, scale: f64| -> Vec<f32> {
        let total = first_update + (cfg.epochs + 1 - first.min(cfg.epochs + 1)) * per_epoch;
        (0..total.max(1))
            .map(|u| (schedule.lr(cfg.unit.step(batch_of(u), per_epoch)) as f64 * scale) as f32)
            .collect()
    };
    let mut scale = hooks.lr_scale();
    optim.set_lr_table(lr_table(schedule, scale))?;
    // The device state the steps share; a step uses the full-batch buffers or the last
    // (partial) batch's.
    struct Buffers {
        full: (Tensor, Indices, Option<Tensor>),
        rem: (Tensor, Indices, Option<Tensor>),
        order: Indices,
        cursor: Indices,
        loss_sum: Tensor,
        correct_sum: Tensor,
    }
    let mut st = Buffers {
        full: (x_full, y_full, soft_full),
        rem: (x_rem, y_rem, soft_rem),
        order,
        cursor,
        loss_sum,
        correct_sum,
    };
    let step = |model: &mut dyn Layer,
                optim: &mut Optim,
                st: &mut Buffers,
                guard: &mut Guard,
                last: bool|
     -> Result<()> {
        let Buffers {
            full,
            rem,
            order,
            cursor,
            loss_sum,
            correct_sum,
        } = st;
        let (x, y, soft) = if last { rem } else { full };
        {
            let counter = optim.step_counter(device).clone();
            let key = |purpose| RandomKey {
                stream,
                step: &counter,
                purpose,
            };
            use crate::data::augment::Augment;
            use crate::rng::purpose::{AUGMENT, AUGMENT_STEP};
            be.gather_augment(
                &images,
                &labels,
                order,
                cursor,
                x,
                y,
                pad,
                flip_p,
                key(AUGMENT),
            );
            if let Some(soft) = soft.as_mut() {
                be.one_hot(y, soft);
            }
            for (k, a) in plan.after.iter().enumerate() {
                let key = key(AUGMENT_STEP + k as u32);
                match (*a, soft.as_mut()) {
                    (Augment::Mixup { alpha }, Some(soft)) => {
                        be.mix_batch(x, soft, alpha, false, key)
                    }
                    (Augment::CutMix { alpha }, Some(soft)) => {
                        be.mix_batch(x, soft, alpha, true, key)
                    }
                    (Augment::Mixup { .. } | Augment::CutMix { .. }, None) => {
                        unreachable!("a plan that mixes has soft labels")
                    }
                    (one, _) => be.augment_samples(x, one, key),
                }
            }
        }
        let logits = {
            let ctx = Ctx::train()
                .at_step(optim.step_counter(device))
                .with_precision(cfg.precision);
            model.forward(x, &ctx)?.to_dtype(DType::F32)
        };
        let out = match soft {
            Some(soft) => ce.forward(&logits, Target::Soft(soft))?,
            None => ce.forward(&logits, Target::Hard(y))?,
        };
        guard.note(&out.loss, optim.step_counter(device));
        model.backward(&out.grad)?;
        if let Some(p) = &cfg.penalty {
            p.apply(model);
        }
        optim.step(model, 0.0)?;
        let rows = x.shape()[0];
        be.axpy(rows as f32, &out.loss, loss_sum);
        let correct = be.count_correct(&logits, y);
        be.axpy(1.0, &correct, correct_sum);
        be.increment(cursor, rows as u32);
        Ok(())
    };
    let mut graph: Option<Box<dyn crate::backend::Graph>> = None;
    let mut guard = Guard::new(device);
    let mut history = Vec::with_capacity(cfg.epochs);
    let epoch_base = |epoch: usize| (epoch - 1) * per_epoch;
    let mut interrupted = None;
    for epoch in first..=cfg.epochs {
        let start = Instant::now();
        guard.begin_epoch(model);
        hooks.epoch_begin(epoch)?;
        if hooks.lr_scale() != scale {
            scale = hooks.lr_scale();
            optim.set_lr_table(lr_table(schedule, scale))?;
        }
        let start_batch = if epoch == first { cfg.first_batch } else { 0 };
        let order_host: Vec<u32> = crate::data::shuffled_order(cfg.seed, n, epoch - 1)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        be.write(
            st.order.tensor_mut(),
            crate::backend::HostBuf::U32(order_host),
        );
        be.write(
            st.cursor.tensor_mut(),
            crate::backend::HostBuf::U32(vec![(start_batch * bsz) as u32]),
        );
        let partial = match (cfg.partial, epoch == first) {
            (Some(p), true) => p,
            _ => [0.0; 3],
        };
        be_write_scalar(&mut st.loss_sum, partial[0] as f32);
        be_write_scalar(&mut st.correct_sum, partial[1] as f32);
        let mut stopped = None;
        for b in start_batch..per_epoch {
            let last = b == full;
            let warming = epoch == first && b < start_batch + 2;
            hooks.step_begin(epoch, b)?;
            match &graph {
                _ if last => step(model, optim, &mut st, &mut guard, true)?,
                Some(g) => {
                    g.replay()?;
                    optim.count_replayed(1);
                }
                None if cfg.graph && !warming => {
                    be.begin_capture()?;
                    let recorded = step(model, optim, &mut st, &mut guard, false);
                    let g = be.end_capture();
                    recorded?;
                    let g = g?;
                    // Recording ran nothing: this step runs now.
                    g.replay()?;
                    graph = Some(g);
                }
                None => step(model, optim, &mut st, &mut guard, false)?,
            }
            let lr = schedule.lr(cfg.unit.step(epoch_base(epoch) + b, per_epoch)) as f64 * scale;
            hooks.step_end(&StepEnd {
                epoch,
                batch: b,
                step: optim.steps(),
                lr,
                loss: None,
                grad_norm: None,
            })?;
            if hooks.stop_now() && b + 1 < per_epoch {
                stopped = Some(b + 1);
                break;
            }
        }
        let seen = stopped.map_or(n, |next| (next * bsz).min(n));
        if let Some(next) = stopped {
            guard.end_epoch(model, epoch, optim.steps())?;
            let sums = [
                st.loss_sum.item() as f64,
                st.correct_sum.item() as f64,
                seen as f64,
            ];
            interrupted = Some((epoch, next, sums));
            break;
        }
        let (train_loss, train_acc) = (
            st.loss_sum.item() / n as f32,
            st.correct_sum.item() / n as f32,
        );
        guard.end_epoch(model, epoch, optim.steps())?;
        let (test_loss, test_acc) = held_out_figures(model, held_out, device)?;
        if held_out.is_some() {
            guard.check_held_out(model, epoch, optim.steps(), test_loss)?;
            schedule.observe(test_loss);
            // A schedule that listens (reduce on plateau) may have changed the rates ahead.
            optim.set_lr_table(lr_table(schedule, scale))?;
        }
        let last = epoch * per_epoch - 1;
        let stats = EpochStats {
            epoch,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            lr: (schedule.lr(cfg.unit.step(last, per_epoch)) as f64 * scale) as f32,
            seconds: start.elapsed().as_secs_f32(),
            samples: n - if epoch == first {
                partial[2] as usize
            } else {
                0
            },
            steps: optim.steps(),
        };
        hooks.epoch_end(&stats, model, optim, schedule)?;
        history.push(stats);
        if hooks.stop_now() && epoch < cfg.epochs {
            return Ok(Ended {
                history,
                interrupted,
                interrupted_between_epochs: true,
            });
        }
        if hooks.stop_after_epoch() {
            break;
        }
    }
    Ok(Ended {
        history,
        interrupted,
        interrupted_between_epochs: false,
    })
}

/// The non-finite guard of a training loop. Each step notes on the device the first step whose
/// loss is not finite (no host read); the epoch's end reads it once, and if the epoch diverged
/// puts the parameters and buffers back to their copy from the start of the epoch (the last
/// state known finite) and stops with [`Error::Diverged`] naming the epoch and the step. The
/// copies are device copies into buffers of their own, made in place, so a recorded graph keeps
/// its pointers.
struct Guard {
    first_bad: Indices,
    snapshot: Vec<Tensor>,
}

impl Guard {
    fn new(device: Device) -> Guard {
        Guard {
            first_bad: Indices::zeros(1, device),
            snapshot: Vec::new(),
        }
    }

    /// Copy every parameter and buffer (into buffers kept from epoch to epoch).
    fn begin_epoch(&mut self, model: &mut dyn Layer) {
        let mut i = 0;
        let snap = &mut self.snapshot;
        let mut save = |t: &Tensor| {
            let be = t.backend();
            if i == snap.len() {
                snap.push(be.alloc(t.shape(), t.dtype()));
            }
            be.copy(t, &mut snap[i]);
            i += 1;
        };
        model.visit_params_unnamed(&mut |p| save(&p.value));
        model.visit_buffers("", &mut |_, b| save(b));
    }

    fn note(&mut self, loss: &Tensor, step: &Indices) {
        loss.backend()
            .note_nonfinite(loss, step, &mut self.first_bad);
    }

    /// `Ok` if every loss of the epoch was finite (one read) and so is every parameter after
    /// its last update (one read per parameter tensor: a blow-up in the last update shows in
    /// no loss of this epoch, and would be snapshotted as the next epoch's good state).
    /// `last_step` is the epoch's last step (1-based).
    fn end_epoch(&mut self, model: &mut dyn Layer, epoch: usize, last_step: u64) -> Result<()> {
        let step = self.first_bad.to_vec()[0];
        let (step, what, verb) = if step != 0 {
            (step as u64, "loss", "is")
        } else {
            let mut finite = true;
            model.visit_params_unnamed(&mut |p| {
                if finite {
                    finite = p.value.backend().all_finite(&p.value).item() != 0.0;
                }
            });
            if finite {
                return Ok(());
            }
            (last_step, "weights after the update", "are")
        };
        self.fail(model, epoch, step, what, verb)
    }

    /// `Ok` if the held-out loss after the epoch is finite; else as a non-finite loss: the
    /// weights are finite but give non-finite logits (a blow-up in the epoch's last update).
    fn check_held_out(
        &mut self,
        model: &mut dyn Layer,
        epoch: usize,
        last_step: u64,
        loss: f32,
    ) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        self.fail(
            model,
            epoch,
            last_step,
            "validation loss after the update",
            "is",
        )
    }

    /// Put the model back to the start of the epoch and say why.
    fn fail(
        &mut self,
        model: &mut dyn Layer,
        epoch: usize,
        step: u64,
        what: &'static str,
        verb: &'static str,
    ) -> Result<()> {
        let mut i = 0;
        let snap = &self.snapshot;
        let mut restore = |t: &mut Tensor| {
            t.backend().copy(&snap[i], t);
            i += 1;
        };
        model.visit_params_unnamed(&mut |p| restore(&mut p.value));
        model.visit_buffers("", &mut |_, b| restore(b));
        Err(Error::Diverged {
            epoch,
            step,
            what,
            verb,
            restored: if epoch > 1 {
                format!("after epoch {}", epoch - 1)
            } else {
                "before training".into()
            },
        })
    }
}

/// One line on stderr: where the epoch is and when it should end (rewritten in place on a
/// terminal, a new line in a log).
fn report_progress(epoch: usize, epochs: usize, batch: usize, per_epoch: usize, start: Instant) {
    use std::io::{IsTerminal, Write};
    let elapsed = start.elapsed().as_secs_f32();
    let left = elapsed / batch.max(1) as f32 * (per_epoch - batch) as f32;
    let line = format!("epoch {epoch}/{epochs}: batch {batch}/{per_epoch}, {elapsed:.0}s elapsed, about {left:.0}s left");
    let mut err = std::io::stderr();
    let _ = if err.is_terminal() {
        write!(err, "\r{line}\x1b[K")
    } else {
        writeln!(err, "{line}")
    };
    let _ = err.flush();
}

fn clear_progress() {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[K");
    }
}

/// Train with plain mini-batch SGD at a constant learning rate.
pub fn fit_sgd(
    model: &mut dyn Layer,
    train: &Dataset,
    test: &Dataset,
    cfg: &SgdConfig,
    on_epoch: impl FnMut(&EpochStats),
) -> Result<Vec<EpochStats>> {
    cfg.validate()?;
    let mut optim = Optim::new(Sgd::default(), OptimConfig::default())?;
    let fit_cfg = FitConfig {
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        device: cfg.device,
        ..Default::default()
    };
    fit(
        model,
        Arc::new(train.clone()),
        test,
        &fit_cfg,
        &mut optim,
        &mut Constant(cfg.lr as f64),
        on_epoch,
    )
}
