//! A plain training loop: mini-batch SGD on a [`Dataset`] with per-epoch loss and accuracy.
//! (The full `Trainer` with optimizers, schedules and callbacks builds on the same step.)
//!
//! One step: `forward(x, Train)` -> fused softmax cross-entropy -> `backward(dlogits)` ->
//! `theta -= lr grad` -> zero the gradients. The loss and the correct count of each batch are
//! accumulated on the device and read once per epoch.

use std::time::Instant;

use crate::backend::Target;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::layer::{sgd_step, zero_grads, Layer, Mode};
use crate::loss::CrossEntropy;
use crate::rng::Rng;
use crate::tensor::{Device, Tensor};

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
        let logits = model.forward(&x, Mode::Eval)?;
        let out = ce.forward(&logits, Target::Hard(&y))?;
        meter.add(&logits, &out.loss, &y);
    }
    Ok(meter.read())
}

/// Train with mini-batch SGD; `on_epoch` sees each epoch's statistics as they come.
pub fn fit_sgd(
    model: &mut dyn Layer,
    train: &Dataset,
    test: &Dataset,
    cfg: &SgdConfig,
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<Vec<EpochStats>> {
    cfg.validate()?;
    let ce = CrossEntropy::new();
    let mut rng = Rng::new(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut history = Vec::with_capacity(cfg.epochs);
    // Nothing uses the gradient of the input images.
    model.set_input_grad(false);
    for epoch in 1..=cfg.epochs {
        let start = Instant::now();
        rng.shuffle(&mut order);
        let mut meter = Meter::new(cfg.device);
        for chunk in order.chunks(cfg.batch_size) {
            let (x, y) = train.batch(chunk, cfg.device)?;
            let logits = model.forward(&x, Mode::Train)?;
            let out = ce.forward(&logits, Target::Hard(&y))?;
            model.backward(&out.grad)?;
            sgd_step(model, cfg.lr);
            zero_grads(model);
            meter.add(&logits, &out.loss, &y);
        }
        let (train_loss, train_acc) = meter.read();
        let (test_loss, test_acc) = evaluate(model, test, 256, cfg.device)?;
        let stats = EpochStats {
            epoch,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            seconds: start.elapsed().as_secs_f32(),
        };
        on_epoch(&stats);
        history.push(stats);
    }
    Ok(history)
}
