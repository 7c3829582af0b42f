//! `learning-rate`: loss curves for very high, high, low and good learning rates; warmup (none,
//! constant, gradual) at a large batch; a cyclic schedule; the linear scaling rule across batch
//! sizes (Goyal et al. 2017: multiply the rate by k when the batch grows k times).

use anyhow::Result;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::schedule::parse_schedule;

use super::report::Report;
use super::{Data, Trained};
use crate::plot::{self, Plot, Series};

const SPEC: &str = "flatten,linear:256,relu,linear:128,relu,linear:classes";

fn sgd() -> Optim {
    Optim::new(
        Sgd {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        },
        OptimConfig::default(),
    )
    .expect("valid")
}

/// Train [`SPEC`] with `schedule` (a schedule spec at base rate `lr`, `warmup` steps).
pub fn run(
    data: &Data,
    schedule: &str,
    lr: f64,
    warmup: usize,
    warmup_factor: Option<f64>,
    epochs: usize,
    batch: usize,
) -> Result<Trained> {
    let per_epoch = data.prepared.train.len().div_ceil(batch);
    let s = parse_schedule(schedule, lr, epochs * per_epoch, warmup, warmup_factor)?;
    super::train(data, SPEC, sgd(), s, epochs, batch)
}

fn step_series(name: &str, t: &Trained, samples_per_step: usize) -> Series {
    // x in samples seen, so that runs of different batch sizes share an axis.
    Series::new(
        name,
        t.steps
            .iter()
            .map(|&(s, l)| ((s as usize * samples_per_step) as f64, l as f64))
            .collect(),
    )
}

fn row(name: &str, t: &Trained) -> Vec<String> {
    let last = t.history.last();
    vec![
        name.to_string(),
        last.map_or("-".into(), |r| format!("{:.4}", r.train_loss)),
        last.and_then(|r| r.val_acc)
            .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
        match (&t.diverged, t.history.first(), last) {
            (Some(_), _, _) => format!("yes: non-finite in epoch {}", t.history.len() + 1),
            (None, Some(a), Some(b)) if b.train_loss > 10.0 * a.train_loss.max(1.0) => {
                "exploded".into()
            }
            _ => "no".into(),
        },
    ]
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    let epochs = if quick { 10 } else { 8 };
    r.heading(1, "Learning rates");
    r.text(&format!(
        "The MLP `{SPEC}` on {}, SGD with momentum 0.9, {epochs} epochs. Losses are recorded every tenth of an epoch.",
        data.name
    ));

    r.heading(2, "Too high, too low, good");
    let mut series = Vec::new();
    let mut rows = Vec::new();
    for (name, lr) in [
        ("very high (3.0)", 3.0),
        ("high (0.5)", 0.5),
        ("low (1e-4)", 1e-4),
        ("good (0.02)", 0.02),
    ] {
        let t = run(data, "constant", lr, 0, None, epochs, 64)?;
        rows.push(row(name, &t));
        series.push(step_series(name, &t, 64));
    }
    r.table(
        &[
            "learning rate",
            "final train loss",
            "validation accuracy",
            "diverged",
        ],
        rows,
    );
    plot::lines(
        &r.path("lr-rates.png"),
        &Plot {
            title: "Training loss for each learning rate",
            x_label: "training samples seen",
            y_label: "cross-entropy (log scale)",
            log_y: true,
        },
        &series,
    )?;
    r.figure("lr-rates.png", "A very high rate diverges (its curve stops where the loss became non-finite), a high one stalls at a poor loss, a low one learns slowly, a good one learns fast.");

    let big = if quick { 256 } else { 1024 };
    let lr_big = 0.02 * big as f64 / 64.0;
    let per_epoch = data.prepared.train.len().div_ceil(big);
    let warm = (per_epoch * epochs / 4).max(1);
    r.heading(2, &format!("Warmup at batch {big}"));
    r.text(&format!(
        "The linear scaling rule gives rate {lr_big} at batch {big} (0.02 at 64). Warmup over the first {warm} updates: none, constant (a tenth of the rate, then the full rate), gradual (a linear ramp from a small fraction of the rate)."
    ));
    let mut series = Vec::new();
    let mut rows = Vec::new();
    for (name, w, f) in [
        ("no warmup", 0, None),
        ("constant warmup", warm, Some(0.1)),
        ("gradual warmup", warm, None),
    ] {
        let t = run(data, "constant", lr_big, w, f, epochs, big)?;
        rows.push(row(name, &t));
        series.push(step_series(name, &t, big));
    }
    r.table(
        &[
            "warmup",
            "final train loss",
            "validation accuracy",
            "diverged",
        ],
        rows,
    );
    plot::lines(
        &r.path("lr-warmup.png"),
        &Plot {
            title: &format!("Warmup at batch {big}, rate {lr_big}"),
            x_label: "training samples seen",
            y_label: "cross-entropy (log scale)",
            log_y: true,
        },
        &series,
    )?;
    r.figure(
        "lr-warmup.png",
        "Training loss with and without warmup at a large batch.",
    );

    r.heading(2, "A cyclic schedule");
    let per = data.prepared.train.len().div_ceil(64);
    let cyc = format!("cyclic:min=0.002,max=0.05,up={},down={}", per / 2, per / 2);
    let mut series = Vec::new();
    let mut rows = Vec::new();
    for (name, sched) in [
        ("constant 0.02", "constant".to_string()),
        ("triangular 0.002..0.05", cyc.clone()),
    ] {
        let t = run(data, &sched, 0.02, 0, None, epochs, 64)?;
        rows.push(row(name, &t));
        series.push(step_series(name, &t, 64));
    }
    r.table(
        &[
            "schedule",
            "final train loss",
            "validation accuracy",
            "diverged",
        ],
        rows,
    );
    let s = parse_schedule(&cyc, 0.02, epochs * per, 0, None)?;
    plot::lines(
        &r.path("lr-cyclic-rate.png"),
        &Plot {
            title: "The triangular cyclic schedule",
            x_label: "update",
            y_label: "learning rate",
            log_y: false,
        },
        &[Series::new(
            "",
            (0..epochs * per)
                .map(|t| (t as f64, s.lr(t) as f64))
                .collect(),
        )],
    )?;
    r.figure(
        "lr-cyclic-rate.png",
        "The learning rate of the cyclic schedule (one cycle per epoch).",
    );
    plot::lines(
        &r.path("lr-cyclic.png"),
        &Plot {
            title: "Constant vs cyclic",
            x_label: "training samples seen",
            y_label: "cross-entropy (log scale)",
            log_y: true,
        },
        &series,
    )?;
    r.figure(
        "lr-cyclic.png",
        "Training loss under a constant and a cyclic rate.",
    );

    r.heading(2, "The linear scaling rule");
    let sizes: &[usize] = if quick {
        &[32, 64, 128]
    } else {
        &[32, 64, 128, 256, 512]
    };
    let mut rows = Vec::new();
    let mut scaled = Vec::new();
    let mut fixed = Vec::new();
    for &b in sizes {
        let lr = 0.01 * b as f64 / 32.0;
        let a = run(data, "constant", lr, 0, None, epochs, b)?;
        let c = run(data, "constant", 0.01, 0, None, epochs, b)?;
        let acc = |t: &Trained| t.history.last().and_then(|r| r.val_acc).unwrap_or(f32::NAN);
        rows.push(vec![
            b.to_string(),
            format!("{lr}"),
            format!("{:.2}%", 100.0 * acc(&a)),
            format!("{:.2}%", 100.0 * acc(&c)),
        ]);
        scaled.push((b as f64, 100.0 * acc(&a) as f64));
        fixed.push((b as f64, 100.0 * acc(&c) as f64));
    }
    r.text(&format!("The same number of epochs ({epochs}) at each batch size: the rate scaled with the batch (0.01 at 32) against the rate kept at 0.01."));
    r.table(
        &[
            "batch",
            "scaled rate",
            "accuracy, scaled rate",
            "accuracy, rate 0.01",
        ],
        rows,
    );
    plot::lines(
        &r.path("lr-scaling.png"),
        &Plot {
            title: "Validation accuracy after the same epochs",
            x_label: "batch size",
            y_label: "accuracy (%)",
            log_y: false,
        },
        &[
            Series::new("rate scaled with the batch", scaled),
            Series::new("rate fixed at 0.01", fixed),
        ],
    )?;
    r.figure("lr-scaling.png", "With the rate scaled, larger batches keep their accuracy for the same epochs; with a fixed rate they fall behind (fewer updates).");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_high_diverges_and_too_low_lags() {
        let data = Data::load(true, None).unwrap();
        let high = run(&data, "constant", 3.0, 0, None, 10, 64).unwrap();
        // Diverged (non-finite), or learned nothing: near chance on the validation split.
        assert!(
            high.diverged.is_some() || high.history.last().unwrap().val_acc.unwrap() < 0.3,
            "lr 3 diverges or learns nothing"
        );
        let low = run(&data, "constant", 1e-4, 0, None, 10, 64).unwrap();
        let good = run(&data, "constant", 0.02, 0, None, 10, 64).unwrap();
        let loss = |t: &Trained| t.history.last().unwrap().train_loss;
        assert!(
            loss(&low) > 1.5 * loss(&good),
            "{} vs {}",
            loss(&low),
            loss(&good)
        );
        // The scaling rule: at batch 128, the scaled rate beats the unscaled one.
        let acc = |t: &Trained| t.history.last().unwrap().val_acc.unwrap();
        let scaled = run(&data, "constant", 0.04, 0, None, 10, 128).unwrap();
        let fixed = run(&data, "constant", 0.01, 0, None, 10, 128).unwrap();
        assert!(
            acc(&scaled) > acc(&fixed),
            "{} vs {}",
            acc(&scaled),
            acc(&fixed)
        );
    }
}
