//! `fitting`: underfitting and overfitting across model capacity (train and test error, the
//! generalization gap), early stopping on the validation curve, and a width sweep looking for
//! double descent (Belkin et al. 2019; Nakkiran et al. 2019) on a small training set with
//! noisy labels.

use anyhow::Result;
use regimen::data::Dataset;
use regimen::optim::{Adam, Optim, OptimConfig};
use regimen::schedule::Constant;
use regimen::train::{evaluate, FitConfig};
use regimen::trainer::{EarlyStopping, Mode, Trainer};
use regimen::{models, Rng};

use super::report::Report;
use super::Data;
use crate::plot::{self, Plot, Series};

/// Train errors of one width: `(train error, test error)` after `epochs` of Adam.
pub fn errors(train: &Dataset, test: &Dataset, width: usize, epochs: usize) -> Result<(f64, f64)> {
    let spec = format!("flatten,linear:{width},relu,linear:classes");
    let model = models::for_input(
        &spec,
        train.image_shape,
        train.num_classes(),
        &mut Rng::new(4),
    )?;
    let optim = Optim::new(Adam::default(), OptimConfig::default())?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed: 4,
        workers: 0,
        ..Default::default()
    };
    let mut t = Trainer::new(model, optim, Box::new(Constant(1e-3)), fit, train.clone());
    super::run_training(&mut t)?;
    let (_, tr) = evaluate(&mut t.model, train, 256, regimen::Device::Cpu)?;
    let (_, te) = evaluate(&mut t.model, test, 256, regimen::Device::Cpu)?;
    Ok((1.0 - tr as f64, 1.0 - te as f64))
}

/// `d` with a fraction `noise` of its labels replaced by random classes (seeded).
pub fn with_label_noise(d: &Dataset, noise: f64, seed: u64) -> Dataset {
    let mut out = d.clone();
    let mut rng = Rng::new(seed);
    let k = d.num_classes();
    for l in out.labels.iter_mut() {
        if rng.next_f64() < noise {
            *l = rng.below(k) as u32;
        }
    }
    out
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    let p = &data.prepared;
    let n = if quick { 300 } else { 4000 };
    let small = p
        .train
        .subset(&(0..p.train.len().min(n)).collect::<Vec<_>>());
    let widths: &[usize] = if quick {
        &[2, 8, 32, 128]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    };
    let epochs = if quick { 15 } else { 60 };
    r.heading(1, "Underfitting, overfitting, early stopping");
    r.text(&format!(
        "One-hidden-layer MLPs of growing width trained {epochs} epochs (Adam, lr 1e-3, batch 64) on {} training images of {}, evaluated on the test split. The lecture expects narrow models to underfit (high train and test error) and wide ones to fit the training set while the gap between the two errors grows; the table says what this run did.",
        small.len(),
        data.set
    ));
    let mut rows = Vec::new();
    let (mut tr, mut te) = (Vec::new(), Vec::new());
    for &w in widths {
        let (a, b) = errors(&small, &p.test, w, epochs)?;
        rows.push(vec![
            w.to_string(),
            format!("{:.2}%", 100.0 * a),
            format!("{:.2}%", 100.0 * b),
            format!("{:.2}", 100.0 * (b - a)),
        ]);
        tr.push(((w as f64).log2(), 100.0 * a));
        te.push(((w as f64).log2(), 100.0 * b));
    }
    r.table(
        &["hidden units", "train error", "test error", "gap (points)"],
        rows,
    );
    plot::lines(
        &r.path("fitting-capacity.png"),
        &Plot {
            title: "Error against capacity",
            x_label: "hidden units (log2)",
            y_label: "error (%)",
            log_y: false,
        },
        &[Series::new("train", tr), Series::new("test", te)],
    )?;
    r.figure("fitting-capacity.png", "Train and test error against the hidden layer's width; their distance is the generalization gap.");

    r.heading(2, "Early stopping on the validation curve");
    let wide = if quick { 256 } else { 1024 };
    let model = models::for_input(
        &format!("flatten,linear:{wide},relu,linear:{wide},relu,linear:classes"),
        small.image_shape,
        small.num_classes(),
        &mut Rng::new(6),
    )?;
    let optim = Optim::new(Adam::default(), OptimConfig::default())?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed: 6,
        workers: 0,
        ..Default::default()
    };
    let mut val = p.validation.clone().expect("a validation split");
    val = val.subset(&(0..val.len().min(2000)).collect::<Vec<_>>());
    let mut t = Trainer::new(model, optim, Box::new(Constant(1e-3)), fit, small.clone())
        .with_validation(Some(val))
        .callback(EarlyStopping::new("val_loss", Mode::Min, epochs, 0.0)?);
    super::run_training(&mut t)?;
    let h = t.history().to_vec();
    let best = h
        .iter()
        .min_by(|a, b| a.val_loss.partial_cmp(&b.val_loss).expect("finite"))
        .expect("epochs");
    let last = h.last().expect("epochs");
    let after = if last.epoch > best.epoch {
        format!(
            "and {} after it (to {:.4} at epoch {}), while the training loss {} (from {:.4} to {:.4})",
            if last.val_loss > best.val_loss {
                "rises"
            } else {
                "does not rise"
            },
            last.val_loss.unwrap_or(f32::NAN),
            last.epoch,
            if last.train_loss < best.train_loss {
                "keeps falling"
            } else {
                "does not fall"
            },
            best.train_loss,
            last.train_loss
        )
    } else {
        "the last epoch: within these epochs it did not turn up, so there was nothing to stop early"
            .to_string()
    };
    r.text(&format!(
        "A wide two-layer MLP on the same {} images: the validation loss is lowest at epoch {} ({:.4}), {after}. Early stopping with patience p stops p epochs after the best and keeps the best epoch's weights.",
        small.len(),
        best.epoch,
        best.val_loss.unwrap_or(f32::NAN),
    ));
    plot::lines(
        &r.path("fitting-early-stopping.png"),
        &Plot {
            title: "Training and validation loss",
            x_label: "epoch",
            y_label: "cross-entropy",
            log_y: true,
        },
        &[
            Series::new(
                "train",
                h.iter()
                    .map(|r| (r.epoch as f64, r.train_loss as f64))
                    .collect(),
            ),
            Series::new(
                "validation",
                h.iter()
                    .map(|r| (r.epoch as f64, r.val_loss.unwrap_or(f32::NAN) as f64))
                    .collect(),
            ),
            Series::new(
                &format!("best epoch {}", best.epoch),
                vec![(best.epoch as f64, best.val_loss.unwrap_or(f32::NAN) as f64)],
            ),
        ],
    )?;
    r.figure(
        "fitting-early-stopping.png",
        "The validation curve an early stopper watches.",
    );

    r.heading(2, "A width sweep looking for double descent");
    let noisy = with_label_noise(&small, 0.2, 9);
    let mut rows = Vec::new();
    let mut te = Vec::new();
    let mut lowest_train = (f64::MAX, 0);
    let mut first_fit = None;
    for &w in widths {
        let (a, b) = errors(&noisy, &p.test, w, epochs)?;
        if a < lowest_train.0 {
            lowest_train = (a, w);
        }
        if a <= 0.02 && first_fit.is_none() {
            first_fit = Some(w);
        }
        rows.push(vec![
            w.to_string(),
            format!("{:.2}%", 100.0 * a),
            format!("{:.2}%", 100.0 * b),
        ]);
        te.push(((w as f64).log2(), 100.0 * b));
    }
    let peak = te
        .iter()
        .enumerate()
        .skip(1)
        .take(te.len().saturating_sub(2))
        .find(|(i, p)| p.1 > te[i - 1].1 && p.1 > te[i + 1].1)
        .map(|(_, p)| p.0.exp2().round() as usize);
    r.text(&format!(
        "The same sweep with 20% of the training labels replaced by random classes. Double descent shows as a test-error peak near the width where the model can just fit the noisy training set, falling again beyond it. In this run: {}; {}.",
        match peak {
            Some(w) => format!("a local peak of the test error at width {w}"),
            None => "no interior peak of the test error (with this budget the curve does not show double descent)".into(),
        },
        match first_fit {
            None => format!(
                "no width fit the noisy training set (the lowest training error was {:.2}%, at width {}), so the sweep did not reach the width where the peak is expected",
                100.0 * lowest_train.0,
                lowest_train.1
            ),
            Some(w) => format!("the noisy training set was fit (training error at most 2%) from width {w} on"),
        }
    ));
    r.table(
        &["hidden units", "train error (noisy labels)", "test error"],
        rows,
    );
    plot::lines(
        &r.path("fitting-double-descent.png"),
        &Plot {
            title: "Test error against width, 20% label noise",
            x_label: "hidden units (log2)",
            y_label: "test error (%)",
            log_y: false,
        },
        &[Series::new("test", te)],
    )?;
    r.figure(
        "fitting-double-descent.png",
        "Test error against the hidden layer's width on noisy labels.",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny model underfits (high train error); a wide one fits the training set better and
    /// its generalization gap is larger.
    #[test]
    fn capacity_moves_from_underfitting_to_overfitting() {
        let data = Data::load(true, None).unwrap();
        let p = &data.prepared;
        let small = p.train.subset(&(0..300).collect::<Vec<_>>());
        let (tr_small, te_small) = errors(&small, &p.test, 2, 15).unwrap();
        let (tr_wide, te_wide) = errors(&small, &p.test, 256, 15).unwrap();
        assert!(tr_small > 0.2, "2 units underfit: {tr_small}");
        assert!(tr_wide < 0.02, "256 units fit 300 images: {tr_wide}");
        assert!(te_wide - tr_wide > te_small - tr_small, "the gap grows");
    }

    #[test]
    fn label_noise_changes_the_asked_fraction() {
        let d = regimen::data::digits().unwrap();
        let noisy = with_label_noise(&d, 0.2, 1);
        let changed = d
            .labels
            .iter()
            .zip(&noisy.labels)
            .filter(|(a, b)| a != b)
            .count() as f64;
        // 20% replaced, of which 9 in 10 land on another class.
        let f = changed / d.len() as f64;
        assert!((f - 0.18).abs() < 0.03, "{f}");
    }
}
