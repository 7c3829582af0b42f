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
use crate::error::{Error, Result};
use crate::layer::{Ctx, Layer};
use crate::loss::{CrossEntropy, Penalty};
use crate::optim::{Optim, OptimConfig, Sgd};
use crate::schedule::{Constant, Schedule, Unit};
use crate::tensor::{Device, Indices, Tensor};

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
}

/// Mean cross-entropy and accuracy of `model` on `data` in evaluation mode.
pub fn evaluate(
    model: &mut dyn Layer,
    data: &Dataset,
    batch_size: usize,
    device: Device,
) -> Result<(f32, f32)> {
    let ce = CrossEntropy::new();
    let mut meter = Meter::new(device);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk, device)?;
        let logits = model.forward(&x, &Ctx::eval())?;
        let out = ce.forward(&logits, Target::Hard(&y))?;
        meter.add(&logits, &out.loss, &y);
    }
    Ok(meter.read())
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
        }
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
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<Vec<EpochStats>> {
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
    let loader = Loader {
        pipeline: Arc::new(cfg.augment.clone()),
        workers: cfg.workers,
        ..Loader::new(train, cfg.batch_size, cfg.seed)
    };
    // Nothing uses the gradient of the input images; restored when training ends, however.
    model.set_input_grad(false);
    let result = run_epochs(
        model,
        test,
        cfg,
        optim,
        schedule,
        &loader,
        &ce,
        classes,
        &mut on_epoch,
    );
    model.set_input_grad(true);
    result
}

#[allow(clippy::too_many_arguments)]
fn run_epochs(
    model: &mut dyn Layer,
    test: &Dataset,
    cfg: &FitConfig,
    optim: &mut Optim,
    schedule: &mut dyn Schedule,
    loader: &Loader,
    ce: &CrossEntropy,
    classes: usize,
    on_epoch: &mut impl FnMut(&EpochStats),
) -> Result<Vec<EpochStats>> {
    let per_epoch = loader.batches_per_epoch();
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut batch_index = 0;
    for epoch in 1..=cfg.epochs {
        let start = Instant::now();
        let mut meter = Meter::new(cfg.device);
        let mut lr = 0.0;
        let mut last_report = Instant::now();
        for (b, batch) in loader.epoch(epoch - 1).enumerate() {
            if cfg.progress && last_report.elapsed().as_secs_f32() > 2.0 {
                report_progress(epoch, cfg.epochs, b, per_epoch, start);
                last_report = Instant::now();
            }
            let x = Tensor::from_host(&batch.shape, batch.images, cfg.device)?;
            let y = Indices::from_vec(batch.labels).to_device(cfg.device);
            // The optimizer's step counter keys this step's random draws. The context is
            // dropped before the update increments the counter (no second owner, no copy).
            let logits = {
                let ctx = Ctx::train().at_step(optim.step_counter(cfg.device));
                model.forward(&x, &ctx)?
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
            model.backward(&out.grad)?;
            if let Some(p) = &cfg.penalty {
                p.apply(model);
            }
            lr = schedule.lr(cfg.unit.step(batch_index, per_epoch));
            optim.step(model, lr)?;
            meter.add(&logits, &out.loss, &y);
            batch_index += 1;
        }
        if cfg.progress && start.elapsed().as_secs_f32() > 2.0 {
            clear_progress();
        }
        let (train_loss, train_acc) = meter.read();
        let (test_loss, test_acc) = evaluate(model, test, 256, cfg.device)?;
        schedule.observe(test_loss);
        let stats = EpochStats {
            epoch,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            lr,
            seconds: start.elapsed().as_secs_f32(),
        };
        on_epoch(&stats);
        history.push(stats);
    }
    Ok(history)
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
        &mut Constant(cfg.lr),
        on_epoch,
    )
}
