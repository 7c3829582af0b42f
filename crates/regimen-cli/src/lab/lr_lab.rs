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

/// Whether a run diverged: its loss went non-finite, or blew up past ten times its first
/// recorded value (at least 10) at some point, even if it came down after (a net that blew up
/// and died ends near chance's loss, not at the peak).
fn divergence(t: &Trained) -> Option<String> {
    if t.diverged.is_some() {
        return Some(format!("non-finite in epoch {}", t.history.len() + 1));
    }
    let first = t.steps.first()?.1;
    let (at, peak) = t
        .steps
        .iter()
        .copied()
        .fold((0, f32::MIN), |m, (s, l)| if l > m.1 { (s, l) } else { m });
    (peak > 10.0 * first.max(1.0)).then(|| format!("the loss reached {peak:.2e} at update {at}"))
}

fn row(name: &str, t: &Trained) -> Vec<String> {
    let last = t.history.last();
    vec![
        name.to_string(),
        last.map_or("-".into(), |r| format!("{:.4}", r.train_loss)),
        last.and_then(|r| r.val_acc)
            .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
        divergence(t).map_or("no".into(), |why| format!("yes: {why}")),
    ]
}

/// The final training loss, or "-" for a run that stopped on a non-finite loss.
fn final_loss(t: &Trained) -> String {
    match (&t.diverged, t.history.last()) {
        (None, Some(r)) => format!("{:.4}", r.train_loss),
        _ => "-".into(),
    }
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
    let mut runs = Vec::new();
    for (name, lr) in [
        ("very high (3.0)", 3.0),
        ("high (0.5)", 0.5),
        ("low (1e-4)", 1e-4),
        ("good (0.02)", 0.02),
    ] {
        let t = run(data, "constant", lr, 0, None, epochs, 64)?;
        rows.push(row(name, &t));
        series.push(step_series(name, &t, 64));
        runs.push(t);
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
    let very_high = match (&runs[0].diverged, divergence(&runs[0])) {
        (Some(_), Some(why)) => format!("diverged ({why}; its curve stops there)"),
        (None, Some(why)) => format!(
            "diverged ({why}) and ended at loss {}",
            final_loss(&runs[0])
        ),
        (_, None) => format!("did not diverge here (final loss {})", final_loss(&runs[0])),
    };
    r.figure(
        "lr-rates.png",
        &format!(
            "The lecture's picture: a very high rate diverges, a high one stalls at a poor loss, a low one learns slowly, a good one learns fast. In this run the very high rate {very_high}; the final training losses of the high, low and good rates are {}, {} and {}.",
            final_loss(&runs[1]),
            final_loss(&runs[2]),
            final_loss(&runs[3])
        ),
    );

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
    // One cycle per epoch: up half of its updates, down the rest.
    let cyc = format!(
        "cyclic:min=0.002,max=0.05,up={},down={}",
        per / 2,
        per - per / 2
    );
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
            Series::new("rate scaled with the batch", scaled.clone()),
            Series::new("rate fixed at 0.01", fixed.clone()),
        ],
    )?;
    let (b0, b1) = (sizes[0], sizes[sizes.len() - 1]);
    let (s0, s1) = (scaled[0].1, scaled[scaled.len() - 1].1);
    let (f0, f1) = (fixed[0].1, fixed[fixed.len() - 1].1);
    r.figure(
        "lr-scaling.png",
        &format!(
            "The rule's claim: with the rate scaled, larger batches keep their accuracy for the same epochs; with a fixed rate they fall behind (fewer updates). In this run, from batch {b0} to {b1}, the scaled rate went from {s0:.2}% to {s1:.2}% ({:+.2} points) and the fixed rate from {f0:.2}% to {f1:.2}% ({:+.2} points). The y-axis spans only the measured accuracies.",
            s1 - s0,
            f1 - f0
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_that_blew_up_and_came_down_diverged() {
        let t = |steps: Vec<(u64, f32)>| Trained {
            history: Vec::new(),
            steps,
            diverged: None,
        };
        let died = t(vec![(0, 2.3), (10, 1.2e7), (20, 2.31)]);
        assert_eq!(
            divergence(&died).as_deref(),
            Some("the loss reached 1.20e7 at update 10")
        );
        assert_eq!(divergence(&t(vec![(0, 2.3), (10, 20.0), (20, 0.5)])), None);
        let nan = Trained {
            diverged: Some("non-finite".into()),
            ..t(vec![(0, 2.3)])
        };
        assert_eq!(divergence(&nan).as_deref(), Some("non-finite in epoch 1"));
    }

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
