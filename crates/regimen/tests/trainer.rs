//! The trainer: early stopping, best-weights restore, snapshot ensembles, exact resume, the
//! NaN guard's last good checkpoint, TensorBoard and metrics files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use regimen::data::{Pipeline, PreprocessKind};
use regimen::ensemble::{self, Member};
use regimen::layer::Layer;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::schedule::{parse_schedule, Constant, Unit};
use regimen::train::{evaluate, FitConfig, StepEnd};
use regimen::trainer::{
    Callback, Control, EarlyStopping, Ending, MetricsCsv, Mode, Prepared, Record, SnapshotEnsemble,
    Trainer,
};
use regimen::{models, Rng};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("regimen-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn record(epoch: usize, val_loss: f32, val_acc: f32) -> Record {
    Record {
        epoch,
        train_loss: 0.0,
        train_acc: 0.0,
        val_loss: Some(val_loss),
        val_acc: Some(val_acc),
        gap: Some(0.0),
        lr: 0.1,
        samples_per_sec: 0.0,
        seconds: 0.0,
        step: epoch as u64,
    }
}

/// Replaying a history twice (a second `run` of one trainer) counts its epochs once: two
/// epochs without improvement under patience 3 stop nothing, however often they are replayed;
/// a third does.
#[test]
fn early_stopping_replays_a_history_once() {
    let mut es = EarlyStopping::new("val_loss", Mode::Min, 3, 0.0).unwrap();
    let mut history = vec![
        record(1, 1.0, 0.0),
        record(2, 1.1, 0.0),
        record(3, 1.2, 0.0),
    ];
    for _ in 0..2 {
        let mut control = Control::default();
        es.on_train_begin(&history, &mut control).unwrap();
        assert_eq!(control.stopping(), None);
    }
    history.push(record(4, 1.3, 0.0));
    let mut control = Control::default();
    es.on_train_begin(&history, &mut control).unwrap();
    assert!(
        control
            .stopping()
            .is_some_and(|r| r.contains("has not improved for 3 epochs")),
        "{control:?}"
    );
}

#[test]
fn early_stopping_on_a_scripted_metric_sequence() {
    let losses = [1.0, 0.9, 0.95, 0.91, 0.89, 0.9];
    // min_delta 0: improvements at 1, 2 and 5; patience 2 stops at epoch 4 (3 and 4 did not
    // improve on 0.9).
    let mut es = EarlyStopping::new("val_loss", Mode::Min, 2, 0.0).unwrap();
    let decisions: Vec<(bool, bool)> = losses
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let (improved, stop) = es.observe(&record(i + 1, l, 0.0)).unwrap();
            (improved, stop.is_some())
        })
        .collect();
    assert_eq!(
        decisions[..4],
        [(true, false), (true, false), (false, false), (false, true)]
    );
    // min_delta 0.02: 0.89 is not better than 0.9 by more than 0.02 either.
    let mut es = EarlyStopping::new("val_loss", Mode::Min, 4, 0.02).unwrap();
    let improved: Vec<bool> = losses
        .iter()
        .enumerate()
        .map(|(i, &l)| es.observe(&record(i + 1, l, 0.0)).unwrap().0)
        .collect();
    assert_eq!(improved, [true, true, false, false, false, false]);
    assert_eq!(es.best(), Some((2, 0.8999999761581421)));
    // An accuracy is maximized; the wait restarts at each improvement.
    let mut es = EarlyStopping::new("val_acc", Mode::Max, 2, 0.0).unwrap();
    let accs = [0.5, 0.6, 0.55, 0.7, 0.69, 0.68];
    let stops: Vec<bool> = accs
        .iter()
        .enumerate()
        .map(|(i, &a)| es.observe(&record(i + 1, 0.0, a)).unwrap().1.is_some())
        .collect();
    assert_eq!(stops, [false, false, false, false, false, true]);
    assert!(EarlyStopping::new("val_f1", Mode::Max, 2, 0.0).is_err());
    // Without a validation split there is no val_loss: an error, not a silent "never stop".
    let mut r = record(1, 0.0, 0.0);
    r.val_loss = None;
    let err = EarlyStopping::new("val_loss", Mode::Min, 2, 0.0)
        .unwrap()
        .observe(&r)
        .unwrap_err();
    assert!(err.to_string().contains("validation split"), "{err}");
}

/// The digits, a validation split, normalization.
fn digits(validation: f64) -> Prepared {
    let s = regimen::data::load("digits", None).unwrap();
    Prepared::new(s.train, s.test, PreprocessKind::Normalize, validation, 0).unwrap()
}

struct Setup {
    spec: &'static str,
    lr: f64,
    momentum: f64,
    epochs: usize,
    schedule: &'static str,
    augment: &'static str,
    unit: Unit,
}

fn trainer(p: &Prepared, s: &Setup) -> Trainer {
    let [c, h, w] = p.train.image_shape;
    let model = models::for_input(s.spec, [c, h, w], 10, &mut Rng::new(7)).unwrap();
    let optim = Optim::new(
        Sgd {
            momentum: s.momentum,
            dampening: 0.0,
            nesterov: false,
        },
        OptimConfig::default(),
    )
    .unwrap();
    let per_epoch = p.train.len().div_ceil(32);
    let total = match s.unit {
        Unit::Batch => s.epochs * per_epoch,
        Unit::Epoch => s.epochs,
    };
    let schedule = parse_schedule(s.schedule, s.lr, total, 0, None).unwrap();
    let fit = FitConfig {
        epochs: s.epochs,
        batch_size: 32,
        seed: 5,
        unit: s.unit,
        augment: Pipeline::parse(s.augment).unwrap(),
        workers: 2,
        ..Default::default()
    };
    Trainer::new(model, optim, schedule, fit, p.train.clone())
        .with_validation(p.validation.clone())
        .with_test(Some(p.test.clone()))
        .with_preprocess(Some(p.preprocess.clone()))
}

fn weights(m: &mut dyn Layer) -> Vec<(String, Vec<u32>)> {
    let mut v = Vec::new();
    m.visit_params("", &mut |n, p| {
        v.push((
            n.to_string(),
            p.value.to_vec().iter().map(|x| x.to_bits()).collect(),
        ))
    });
    m.visit_buffers("", &mut |n, b| {
        v.push((
            n.to_string(),
            b.to_vec().iter().map(|x| x.to_bits()).collect(),
        ))
    });
    v
}

#[test]
fn restore_best_puts_back_the_best_epoch() {
    let p = digits(0.2);
    let setup = Setup {
        spec: "flatten,linear:64,relu,linear:classes",
        lr: 0.8,
        momentum: 0.9,
        epochs: 8,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let mut t = trainer(&p, &setup).callback(
        EarlyStopping::new("val_loss", Mode::Min, 100, 0.0)
            .unwrap()
            .restore_best_weights(),
    );
    let out = t.run().unwrap();
    assert_eq!(out.ending, Ending::Completed);
    let h = t.history().to_vec();
    let best = h
        .iter()
        .min_by(|a, b| a.val_loss.partial_cmp(&b.val_loss).unwrap())
        .unwrap();
    assert_ne!(
        best.epoch,
        h.len(),
        "the setup must make the last epoch worse than the best: {h:?}"
    );
    let (loss, _) = evaluate(
        &mut t.model,
        p.validation.as_ref().unwrap(),
        256,
        regimen::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        loss,
        best.val_loss.unwrap(),
        "the model is the best epoch's"
    );
}

#[test]
fn early_stopping_stops_the_run() {
    let p = digits(0.2);
    let setup = Setup {
        spec: "flatten,linear:64,relu,linear:classes",
        lr: 0.8,
        momentum: 0.9,
        epochs: 30,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let dir = scratch("earlystop");
    let ckpt = dir.join("last.safetensors");
    let es = || EarlyStopping::new("val_loss", Mode::Min, 2, 0.0).unwrap();
    let mut t = trainer(&p, &setup)
        .callback(es())
        .checkpoint_every_epoch(ckpt.clone());
    let out = t.run().unwrap();
    let Ending::Stopped(reason) = &out.ending else {
        panic!("{:?}", out.ending)
    };
    assert!(
        reason.contains("val_loss has not improved for 2 epochs"),
        "{reason}"
    );
    assert!(t.history().len() < 30);
    assert!(
        out.test.is_some(),
        "the test set is evaluated after an early stop"
    );
    // Resumed, the stopped run stays stopped: no further epoch, the same weights and test.
    let mut again = trainer(&p, &setup).callback(es());
    again.resume(&ckpt).unwrap();
    let out2 = again.run().unwrap();
    assert!(
        matches!(&out2.ending, Ending::Stopped(r) if r == reason),
        "{:?}",
        out2.ending
    );
    assert_eq!(again.history().len(), t.history().len());
    assert_eq!(weights(&mut again.model), weights(&mut t.model));
    assert_eq!(out2.test, out.test);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run that ends just after a warm restart (epoch 7 of cycles of 3) takes no snapshot at
/// that peak rate; a run that ends at a cycle's bottom takes one there.
#[test]
fn no_snapshot_at_a_restart_that_began_at_the_end() {
    let p = digits(0.1);
    for (epochs, want) in [(7, vec![3, 6]), (6, vec![3, 6]), (5, vec![3, 5])] {
        let dir = scratch(&format!("snap-end-{epochs}"));
        let setup = Setup {
            spec: "flatten,linear:16,relu,linear:classes",
            lr: 0.1,
            momentum: 0.0,
            epochs,
            schedule: "restarts:t0=3",
            augment: "none",
            unit: Unit::Epoch,
        };
        let mut t = trainer(&p, &setup).callback(SnapshotEnsemble::new(dir.clone()));
        t.run().unwrap();
        let got: Vec<usize> = (1..=epochs)
            .filter(|&e| SnapshotEnsemble::path_for(&dir, e).is_file())
            .collect();
        assert_eq!(got, want, "{epochs} epochs");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_snapshot_ensemble_scores_at_least_its_best_member() {
    let dir = scratch("snapshots");
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:128,relu,dropout:0.2,linear:classes",
        lr: 0.1,
        momentum: 0.9,
        epochs: 12,
        schedule: "restarts:t0=3",
        augment: "translate=1",
        unit: Unit::Epoch,
    };
    let mut t = trainer(&p, &setup).callback(SnapshotEnsemble::new(dir.clone()));
    t.run().unwrap();
    // One snapshot per cycle of 3 epochs.
    let files: Vec<PathBuf> = (1..=12)
        .map(|e| SnapshotEnsemble::path_for(&dir, e))
        .filter(|f| f.is_file())
        .collect();
    assert_eq!(
        files,
        [3, 6, 9, 12].map(|e| SnapshotEnsemble::path_for(&dir, e)),
        "a snapshot at the end of each cycle"
    );
    let raw = regimen::data::load("digits", None).unwrap().test;
    let mut members: Vec<Member> = files
        .iter()
        .map(|f| {
            let mut m = models::for_input(setup.spec, [1, 8, 8], 10, &mut Rng::new(0)).unwrap();
            let loaded = regimen::checkpoint::load(f, &mut m).unwrap();
            Member {
                name: f.display().to_string(),
                model: Box::new(m),
                preprocess: loaded.preprocess,
            }
        })
        .collect();
    let report = ensemble::evaluate(&mut members, &raw, regimen::Device::Cpu).unwrap();
    let best = report.members.iter().map(|m| m.2).fold(0.0, f32::max);
    assert!(
        report.accuracy >= best,
        "ensemble {} < best member {best}: {report:?}",
        report.accuracy
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises the stop flag during update `at`, like a Ctrl-C.
struct InterruptAt(u64, Arc<AtomicBool>);

impl Callback for InterruptAt {
    fn on_step_end(&mut self, s: &StepEnd, _c: &mut Control) -> regimen::Result<()> {
        if s.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn without_timing(h: &[Record]) -> Vec<Record> {
    h.iter()
        .map(|r| Record {
            samples_per_sec: 0.0,
            seconds: 0.0,
            ..r.clone()
        })
        .collect()
}

/// A run with dropout, augmentation (with Mixup) and a schedule, interrupted in the middle of
/// an epoch, checkpointed and resumed in a new trainer, ends bit for bit where the
/// uninterrupted run ends: weights, batch-norm statistics, optimizer state, history.
#[test]
fn resume_after_an_interrupt_equals_the_uninterrupted_run() {
    let dir = scratch("resume");
    let p = digits(0.1);
    let setup = Setup {
        spec: "conv:8,bn,relu,dropout:0.2,maxpool:2,flatten,linear:classes",
        lr: 0.1,
        momentum: 0.9,
        epochs: 4,
        schedule: "cosine",
        augment: "crop=1,flip,mixup=0.2",
        unit: Unit::Batch,
    };
    let mut full = trainer(&p, &setup);
    full.run().unwrap();

    let ckpt = dir.join("last.safetensors");
    let mut first = trainer(&p, &setup).checkpoint_every_epoch(ckpt.clone());
    let flag = first.stop_flag();
    // Batch 17 of epoch 2 (41 batches per epoch).
    first.add_callback(Box::new(InterruptAt(58, flag)));
    let out = first.run().unwrap();
    assert_eq!(
        out.ending,
        Ending::Interrupted {
            epoch: 2,
            batch: 17
        }
    );
    assert!(out.test.is_none());

    let mut second = trainer(&p, &setup).checkpoint_every_epoch(ckpt.clone());
    second.resume(&ckpt).unwrap();
    assert_eq!(second.position(), (1, 17));
    let out = second.run().unwrap();
    assert_eq!(out.ending, Ending::Completed);
    assert_eq!(weights(&mut second.model), weights(&mut full.model));
    assert_eq!(second.optim.export_state(), full.optim.export_state());
    assert_eq!(
        without_timing(second.history()),
        without_timing(full.history())
    );

    // Resuming at an epoch boundary (the checkpoint after epoch 3) as well.
    let mut third = trainer(&p, &setup);
    let ckpt3 = dir.join("epoch3.safetensors");
    let mut upto3 = trainer(&p, &setup);
    let flag = upto3.stop_flag();
    upto3.add_callback(Box::new(InterruptAt(3 * 41, flag)));
    upto3.run().unwrap();
    upto3.save_checkpoint(&ckpt3).unwrap();
    third.resume(&ckpt3).unwrap();
    assert_eq!(third.position(), (3, 0));
    third.run().unwrap();
    assert_eq!(weights(&mut third.model), weights(&mut full.model));

    // A checkpoint of another seed is refused, and changes nothing.
    let mut other = trainer(&p, &setup);
    other.fit.seed = 6;
    let before = weights(&mut other.model);
    let err = other.resume(&ckpt).unwrap_err().to_string();
    assert!(err.contains("seed 5") && err.contains("seed 6"), "{err}");
    assert_eq!(weights(&mut other.model), before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises the stop flag after batch `.1` of epoch `.0` (a micro-batch, under accumulation).
struct InterruptAtBatch(usize, usize, Arc<AtomicBool>);

impl Callback for InterruptAtBatch {
    fn on_step_end(&mut self, s: &StepEnd, _c: &mut Control) -> regimen::Result<()> {
        if (s.epoch, s.batch) == (self.0, self.1) {
            self.2.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// With `accumulate = 3`, an interrupt between the micro-batches of an update (and epochs of
/// 41 batches, so that updates straddle epochs) resumes bit for bit: the checkpoint carries the
/// gradients summed so far.
#[test]
fn resume_in_the_middle_of_an_accumulated_update() {
    let dir = scratch("resume-accumulate");
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:32,relu,dropout:0.2,linear:classes",
        lr: 0.1,
        momentum: 0.9,
        epochs: 3,
        schedule: "cosine",
        augment: "translate=1",
        unit: Unit::Batch,
    };
    let accumulating = |t: Trainer| -> Trainer {
        let mut t = t;
        let optim = Optim::new(
            Sgd {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: false,
            },
            OptimConfig {
                accumulate: 3,
                ..Default::default()
            },
        )
        .unwrap();
        t.optim = optim;
        t
    };
    let mut full = accumulating(trainer(&p, &setup));
    full.run().unwrap();
    let ckpt = dir.join("last.safetensors");
    let mut first = accumulating(trainer(&p, &setup)).checkpoint_every_epoch(ckpt.clone());
    let flag = first.stop_flag();
    // Batch index 17 of epoch 2 is global batch 58: the second micro-batch of update 19.
    first.add_callback(Box::new(InterruptAtBatch(2, 17, flag)));
    let out = first.run().unwrap();
    assert!(matches!(out.ending, Ending::Interrupted { .. }), "{out:?}");
    assert_eq!(first.optim.pending_micro(), 2);
    let mut second = accumulating(trainer(&p, &setup)).checkpoint_every_epoch(ckpt.clone());
    second.resume(&ckpt).unwrap();
    second.run().unwrap();
    assert_eq!(weights(&mut second.model), weights(&mut full.model));
    assert_eq!(second.optim.export_state(), full.optim.export_state());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run that diverges stops with the epoch and the step, its model back at the start of the
/// epoch, which is the state of the last checkpoint written.
#[test]
fn divergence_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:32,relu,linear:classes",
        lr: 0.05,
        momentum: 0.0,
        epochs: 2,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let last = dir.join("last.safetensors");
    let mut t = trainer(&p, &setup)
        .checkpoint_every_epoch(last.clone())
        .callback(MetricsCsv::new(dir.join("metrics.csv")));
    t.run().unwrap();
    // Two more epochs at an absurd rate.
    t.fit.epochs = 4;
    t.schedule = Box::new(Constant(1e30));
    let err = t.run().unwrap_err();
    assert!(
        matches!(err, regimen::Error::Diverged { epoch: 3, .. }),
        "{err}"
    );
    let mut fresh = models::for_input(setup.spec, [1, 8, 8], 10, &mut Rng::new(1)).unwrap();
    regimen::checkpoint::load(&last, &mut fresh).unwrap();
    assert_eq!(weights(&mut fresh), weights(&mut t.model));
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        3,
        "a header and the two good epochs:\n{csv}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A blow-up in an epoch's last update shows in none of its losses: the epoch's end finds it
/// (non-finite weights, or a non-finite validation loss) and stops as a divergence, the model
/// back at the last good checkpoint, instead of saving the broken model as that epoch's.
#[test]
fn a_blow_up_in_the_last_update_of_an_epoch_is_a_divergence() {
    let dir = scratch("nan-last");
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:32,relu,linear:classes",
        lr: 0.05,
        momentum: 0.0,
        epochs: 2,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let last = dir.join("last.safetensors");
    let mut t = trainer(&p, &setup).checkpoint_every_epoch(last.clone());
    t.run().unwrap();
    // One update per epoch from now on, at an absurd rate: epoch 3's only loss is computed
    // before its update, so only the end-of-epoch checks can see the blow-up.
    t.fit.epochs = 3;
    t.fit.batch_size = 4096;
    t.schedule = Box::new(Constant(1e30));
    let err = t.run().unwrap_err();
    match &err {
        regimen::Error::Diverged { epoch: 3, what, .. } => {
            assert_ne!(*what, "loss", "{err}")
        }
        _ => panic!("{err}"),
    }
    assert!(err.to_string().contains("after the update"), "{err}");
    let mut fresh = models::for_input(setup.spec, [1, 8, 8], 10, &mut Rng::new(1)).unwrap();
    regimen::checkpoint::load(&last, &mut fresh).unwrap();
    assert_eq!(weights(&mut fresh), weights(&mut t.model));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The TensorBoard event file frames every record with the masked CRC32C of its length and
/// data, and holds one event per epoch with the epoch's scalars.
#[test]
fn tensorboard_events_are_framed_and_hold_the_epochs() {
    let dir = scratch("tb");
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:32,relu,linear:classes",
        lr: 0.1,
        momentum: 0.0,
        epochs: 2,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let mut t =
        trainer(&p, &setup).callback(regimen::tensorboard::TensorBoard::new(dir.clone(), 10));
    t.run().unwrap();
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let mask = |c: u32| c.rotate_right(15).wrapping_add(0xa282_ead8);
    let (mut pos, mut records) = (0, Vec::new());
    while pos < bytes.len() {
        let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
        let lcrc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(
            lcrc,
            mask(regimen::tensorboard::crc32c(&bytes[pos..pos + 8]))
        );
        let data = &bytes[pos + 12..pos + 12 + len];
        let dcrc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(dcrc, mask(regimen::tensorboard::crc32c(data)));
        records.push(data.to_vec());
        pos += 16 + len;
    }
    assert!(String::from_utf8_lossy(&records[0]).contains("brain.Event:2"));
    let epoch_events = records
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains("epoch/val_acc"))
        .count();
    assert_eq!(epoch_events, 2);
    // 41 updates per epoch: steps 10, 20, ..., 80.
    let step_events = records
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains("step/grad_norm"))
        .count();
    assert_eq!(step_events, 8);
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a resume, restoring the best weights takes an epoch from before the resume from the
/// early-stopping checkpoint file.
#[test]
fn restore_best_across_a_resume() {
    let dir = scratch("bestresume");
    let p = digits(0.2);
    let setup = Setup {
        spec: "flatten,linear:64,relu,linear:classes",
        lr: 0.8,
        momentum: 0.9,
        epochs: 8,
        schedule: "constant",
        augment: "none",
        unit: Unit::Batch,
    };
    let es = || {
        EarlyStopping::new("val_loss", Mode::Min, 100, 0.0)
            .unwrap()
            .restore_best_weights()
            .best_file(dir.join("es-best.safetensors"))
    };
    let mut full = trainer(&p, &setup).callback(es());
    full.run().unwrap();
    let best = full
        .history()
        .iter()
        .min_by(|a, b| a.val_loss.partial_cmp(&b.val_loss).unwrap())
        .unwrap()
        .clone();
    assert!(
        best.epoch < 7,
        "the best epoch comes early in this setup: {best:?}"
    );
    // Interrupted at the end of epoch 7, resumed in a new trainer that never saw the best epoch.
    let ckpt = dir.join("last.safetensors");
    let mut first = trainer(&p, &setup)
        .callback(es())
        .checkpoint_every_epoch(ckpt.clone());
    let flag = first.stop_flag();
    let per_epoch = p.train.len().div_ceil(32) as u64;
    first.add_callback(Box::new(InterruptAt(7 * per_epoch, flag)));
    assert!(matches!(
        first.run().unwrap().ending,
        Ending::Interrupted { .. }
    ));
    let mut second = trainer(&p, &setup).callback(es());
    second.resume(&ckpt).unwrap();
    second.run().unwrap();
    assert_eq!(weights(&mut second.model), weights(&mut full.model));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The range test leaves no trace: weights, optimizer state, position and history are as
/// before; a training run after it equals one without it, bit for bit.
#[test]
fn lr_find_leaves_no_trace() {
    let p = digits(0.1);
    let setup = Setup {
        spec: "flatten,linear:32,relu,dropout:0.1,linear:classes",
        lr: 0.05,
        momentum: 0.9,
        epochs: 2,
        schedule: "cosine",
        augment: "translate=1",
        unit: Unit::Batch,
    };
    let mut plain = trainer(&p, &setup);
    plain.run().unwrap();
    let mut t = trainer(&p, &setup);
    let before = weights(&mut t.model);
    let test = t.lr_find(1e-6, 10.0, 100, 4.0).unwrap();
    assert_eq!(weights(&mut t.model), before);
    assert_eq!(t.position(), (0, 0));
    assert!(t.history().is_empty());
    assert!(
        test.points.len() > 20 && test.points.len() <= 101,
        "{}",
        test.points.len()
    );
    assert!(test.diverged, "lr 10 diverges");
    // The rates grow exponentially from the start.
    assert!((test.points[0].0 - 1e-6).abs() < 1e-12);
    let ratio = test.points[1].0 / test.points[0].0;
    assert!((ratio - (1e7f64).powf(1.0 / 99.0)).abs() < 1e-4, "{ratio}");
    let s = test.steepest.unwrap();
    assert!(s > 1e-4 && s < 5.0, "{s}");
    t.run().unwrap();
    assert_eq!(weights(&mut t.model), weights(&mut plain.model));
    assert_eq!(without_timing(t.history()), without_timing(plain.history()));
}

/// Snapshots go where the learning rate bottoms out: the bottom of each triangle of a cyclic
/// schedule (not the epochs on its rising side), the end of each cosine cycle of warm
/// restarts (not the epochs of a warmup in front of it), and a schedule whose cycles end
/// inside epochs is found before the run.
#[test]
fn cycles_end_at_the_minima_of_the_learning_rate() {
    use regimen::trainer::{cycle_end_inside_an_epoch, ends_cycle};
    let ends = |spec: &str, warmup: usize, unit: Unit, per_epoch: usize, epochs: usize| {
        let total = match unit {
            Unit::Batch => epochs * per_epoch,
            Unit::Epoch => epochs,
        };
        let s = parse_schedule(spec, 0.1, total, warmup, None).unwrap();
        let at: Vec<usize> = (1..epochs)
            .filter(|&e| ends_cycle(&*s, unit, per_epoch, e))
            .collect();
        (at, cycle_end_inside_an_epoch(&*s, unit, per_epoch, epochs))
    };
    // Per epoch: 0.01, 0.055, 0.1, 0.055, 0.01 (epoch 5), 0.055, 0.1, 0.055.
    assert_eq!(
        ends("cyclic:min=0.01,max=0.1,up=2,down=2", 0, Unit::Epoch, 10, 8),
        (vec![5], None)
    );
    // Two warmup epochs rising, then cycles of 3 epochs: ends at epochs 5, 8, 11.
    assert_eq!(
        ends("restarts:t0=3", 2, Unit::Epoch, 10, 12),
        (vec![5, 8, 11], None)
    );
    // Per batch, cycles of one epoch (41 steps): every epoch ends one.
    assert_eq!(
        ends("restarts:t0=41", 0, Unit::Batch, 41, 3),
        (vec![1, 2], None)
    );
    // Per batch, triangles of two epochs (10 steps up, 10 down): the bottoms are the first
    // steps of epochs 3, 5 and 7, so epochs 2, 4 and 6 end cycles.
    assert_eq!(
        ends(
            "cyclic:min=0.01,max=0.1,up=10,down=10",
            0,
            Unit::Batch,
            10,
            8
        ),
        (vec![2, 4, 6], None)
    );
    // One step per epoch: each bottom is its own epoch (5 and 9), counted once.
    assert_eq!(
        ends("cyclic:min=0.01,max=0.1,up=2,down=2", 0, Unit::Batch, 1, 10),
        (vec![5, 9], None)
    );
    // Cycles of 50 steps in epochs of 41: the first ends at step 49, inside epoch 2.
    assert_eq!(
        ends("restarts:t0=50", 0, Unit::Batch, 41, 3),
        (vec![], Some(49))
    );
    // A warmup and one decay: no cycle ends before the last epoch.
    assert_eq!(ends("cosine", 30, Unit::Batch, 20, 4), (vec![], None));
    assert_eq!(ends("onecycle", 0, Unit::Batch, 20, 4), (vec![], None));
}
