//! Optimizer, schedule and penalty from command-line flags.

use anyhow::{bail, Result};
use regimen::loss::{parse_penalty, Penalty};
use regimen::optim::{Adagrad, Adam, Optim, OptimConfig, RmsProp, Sgd};
use regimen::schedule::{parse_schedule, Schedule, Unit};

/// The optimizer flags of `regimen train`.
#[derive(clap::Args, Clone, Debug, serde::Serialize)]
pub struct OptimArgs {
    /// sgd, adagrad, rmsprop, adam or adamw (SGD takes --momentum and --nesterov).
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Base learning rate (the peak for onecycle and cyclic's max; the target of a warmup,
    /// except before cyclic, which starts at its min).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Momentum (SGD; RMSprop).
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// Nesterov momentum (SGD; needs --momentum > 0).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay: `wd * w` added to the gradient (PyTorch's weight_decay; decoupled,
    /// `w -= lr * wd * w`, for adamw). Default: 0, and 0.01 for adamw (as PyTorch). Biases
    /// and batch-norm parameters are not decayed.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Adam/AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// Adam/AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// Epsilon of Adagrad, RMSprop and Adam (default: each optimizer's own, as PyTorch).
    #[arg(long)]
    pub eps: Option<f64>,
    /// AMSGrad variant of Adam/AdamW.
    #[arg(long)]
    pub amsgrad: bool,
    /// RMSprop's decay of the squared-gradient average.
    #[arg(long, default_value_t = 0.99)]
    pub alpha: f64,
    /// Centered RMSprop.
    #[arg(long)]
    pub centered: bool,
    /// Clip gradients to this global L2 norm.
    #[arg(long)]
    pub clip_norm: Option<f32>,
    /// Clip each gradient element to [-v, v].
    #[arg(long)]
    pub clip_value: Option<f32>,
    /// Accumulate gradients over this many batches per update (at most the number of batches
    /// of the whole run).
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Learning-rate schedule: NAME or NAME:key=value,... (constant, step:size=N, multistep:milestones=a/b,
    /// exp:gamma=G, cosine, linear, poly:power=P, cyclic, onecycle:pct=P, restarts:t0=N,mult=M, plateau:patience=N).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    /// Warmup steps (batches, or epochs with --schedule-unit epoch; with --accumulate N, N
    /// batches make one update) in front of the schedule,
    /// linear up to the schedule's first rate (step s at (s+1)/(N+1) of it) unless
    /// --warmup-factor; the first rate is --lr, and the min for cyclic.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Constant warmup at this fraction of the schedule's first rate instead of a linear ramp.
    #[arg(long)]
    pub warmup_factor: Option<f64>,
    /// Step the schedule per batch or per epoch.
    #[arg(long, default_value = "batch")]
    pub schedule_unit: String,
    /// Weight penalty added to the loss: l1:LAMBDA (LAMBDA sum |w|), l2:LAMBDA (LAMBDA sum
    /// w^2, the lecture's; its gradient 2 LAMBDA w is --weight-decay 2*LAMBDA) or
    /// elastic:LAMBDA:BETA (LAMBDA sum (|w| + BETA w^2)).
    #[arg(long)]
    pub penalty: Option<String>,
}

pub fn optimizer(a: &OptimArgs) -> Result<Optim> {
    let cfg = OptimConfig {
        weight_decay: a
            .weight_decay
            .unwrap_or(if a.optimizer == "adamw" { 0.01 } else { 0.0 }),
        clip_norm: a.clip_norm,
        clip_value: a.clip_value,
        accumulate: a.accumulate,
        ..Default::default()
    };
    if a.momentum != 0.0 && a.optimizer != "sgd" && a.optimizer != "rmsprop" {
        bail!("--momentum applies to sgd and rmsprop, not {}", a.optimizer);
    }
    if a.nesterov && a.optimizer != "sgd" {
        bail!("--nesterov applies to sgd, not {}", a.optimizer);
    }
    if a.eps.is_some() && a.optimizer == "sgd" {
        bail!("--eps applies to adagrad, rmsprop, adam and adamw, not sgd");
    }
    if a.amsgrad && !a.optimizer.starts_with("adam") {
        bail!("--amsgrad applies to adam and adamw, not {}", a.optimizer);
    }
    if a.centered && a.optimizer != "rmsprop" {
        bail!("--centered applies to rmsprop, not {}", a.optimizer);
    }
    // Values away from their defaults that the chosen optimizer would ignore.
    if (a.beta1 != 0.9 || a.beta2 != 0.999) && !a.optimizer.starts_with("adam") {
        bail!(
            "--beta1 and --beta2 apply to adam and adamw, not {}",
            a.optimizer
        );
    }
    if a.alpha != 0.99 && a.optimizer != "rmsprop" {
        bail!("--alpha applies to rmsprop, not {}", a.optimizer);
    }
    if a.warmup_factor.is_some() && a.warmup == 0 {
        bail!("--warmup-factor sets the rate of a warmup: give --warmup N too");
    }
    Ok(match a.optimizer.as_str() {
        "sgd" => Optim::new(
            Sgd {
                momentum: a.momentum,
                dampening: 0.0,
                nesterov: a.nesterov,
            },
            cfg,
        )?,
        "adagrad" => Optim::new(
            Adagrad {
                eps: a.eps.unwrap_or(1e-10),
                ..Default::default()
            },
            cfg,
        )?,
        "rmsprop" => Optim::new(
            RmsProp {
                alpha: a.alpha,
                eps: a.eps.unwrap_or(1e-8),
                momentum: a.momentum,
                centered: a.centered,
            },
            cfg,
        )?,
        kind @ ("adam" | "adamw") => Optim::new(
            Adam {
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps.unwrap_or(1e-8),
                amsgrad: a.amsgrad,
                decoupled: kind == "adamw",
            },
            cfg,
        )?,
        other => {
            bail!("invalid --optimizer {other:?}: expected sgd, adagrad, rmsprop, adam or adamw")
        }
    })
}

/// The schedule over `epochs` epochs of `per_epoch` batches, and its unit. With
/// `check_rates`, every rate of the run is computed now and must be finite and >= 0.
pub fn schedule(
    a: &OptimArgs,
    epochs: usize,
    per_epoch: usize,
    check_rates: bool,
) -> Result<(Box<dyn Schedule>, Unit)> {
    let unit = match a.schedule_unit.as_str() {
        "batch" => Unit::Batch,
        "epoch" => Unit::Epoch,
        other => bail!("invalid --schedule-unit {other:?}: expected batch or epoch"),
    };
    let total = match unit {
        Unit::Batch => epochs * per_epoch,
        Unit::Epoch => epochs,
    };
    let schedule = parse_schedule(&a.schedule, a.lr, total, a.warmup, a.warmup_factor)?;
    // Every rate of the run is checked now, not when training reaches it.
    let stride = (total / 1_000_000).max(1);
    let steps = if check_rates { total } else { 0 };
    for t in (0..steps).step_by(stride).chain(steps.checked_sub(1)) {
        let lr = schedule.lr(t);
        if !(lr >= 0.0 && lr.is_finite()) {
            bail!(
                "invalid --schedule {}: the learning rate at step {t} would be {lr} (it must stay a finite number >= 0)",
                a.schedule
            );
        }
    }
    Ok((schedule, unit))
}

pub fn penalty(a: &OptimArgs) -> Result<Option<Penalty>> {
    Ok(match &a.penalty {
        Some(spec) => Some(parse_penalty(spec)?),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        optim: OptimArgs,
    }

    fn decay(args: &[&str]) -> f32 {
        let cli =
            Cli::try_parse_from(std::iter::once("regimen").chain(args.iter().copied())).unwrap();
        optimizer(&cli.optim).unwrap().config().weight_decay
    }

    /// As PyTorch: AdamW decays by 0.01 unless told otherwise, the others not at all.
    #[test]
    fn weight_decay_defaults_follow_pytorch() {
        assert_eq!(decay(&["--optimizer", "adamw"]), 0.01);
        assert_eq!(decay(&["--optimizer", "adamw", "--weight-decay", "0"]), 0.0);
        assert_eq!(decay(&["--optimizer", "adam"]), 0.0);
        assert_eq!(decay(&["--optimizer", "sgd"]), 0.0);
        assert_eq!(decay(&["--weight-decay", "0.1"]), 0.1);
    }
}
