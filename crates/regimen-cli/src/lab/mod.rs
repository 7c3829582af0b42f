//! `regimen lab`: the lecture's experiments, each one command that writes PNG plots, a Markdown
//! report and the same report as one self-contained HTML page.

mod activation_functions;
mod activations;
mod augmentation;
mod ensembles;
mod fitting;
mod init_lab;
mod lr_lab;
mod optimizers;
mod preprocessing;
mod regularization;
pub mod report;

use std::path::PathBuf;

use anyhow::{bail, Result};
use regimen::data::PreprocessKind;
use regimen::optim::{Adagrad, Adam, Optim, OptimConfig, RmsProp, Sgd};
use regimen::schedule::Constant;
use regimen::train::FitConfig;
use regimen::trainer::{Prepared, Record, Trainer};
use regimen::{models, Rng};

use report::Report;

/// The experiment running now and the trainings it started, for the progress lines.
static CURRENT: std::sync::Mutex<(&str, usize, Option<std::time::Instant>)> =
    std::sync::Mutex::new(("", 0, None));

/// Run a lab's training with a progress line on stderr at most every 5 seconds (which
/// experiment, which of its trainings, which epoch): labs train many models for minutes.
pub fn run_training(t: &mut Trainer) -> regimen::Result<regimen::trainer::Outcome> {
    let n = {
        let mut c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        c.1 += 1;
        c.1
    };
    t.add_callback(Box::new(Progress { training: n }));
    t.run()
}

struct Progress {
    training: usize,
}

impl regimen::trainer::Callback for Progress {
    fn on_epoch_end(&mut self, end: &mut regimen::trainer::EpochEnd) -> regimen::Result<()> {
        let mut c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if c.2
            .is_none_or(|last| now.duration_since(last).as_secs_f64() >= 5.0)
        {
            c.2 = Some(now);
            tell!(
                "  lab {}: training {}, epoch {} done",
                c.0,
                self.training,
                end.record.epoch
            );
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct LabArgs {
    /// An experiment (see `regimen lab list`), `all`, or `list`.
    pub name: String,
    /// The report folder (default: lab/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A small, fast version (seconds; the embedded digits).
    #[arg(long)]
    pub quick: bool,
    /// Where Fashion-MNIST is (else $REGIMEN_DATA, else /usr/share/datasets/fashion-mnist);
    /// without it the embedded digits are used.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

type Run = fn(&mut Report, bool, &Data) -> Result<()>;

/// The experiments: name, one line, run.
fn experiments() -> Vec<(&'static str, &'static str, Run)> {
    vec![
        (
            "activations",
            "per-layer activation statistics, histograms and gradients of a deep net under each initialization",
            |r, q, _| activations::lab(r, q),
        ),
        (
            "activation-functions",
            "each activation with its derivative, and the same network trained with each (accuracy, speed, dead ReLUs)",
            activation_functions::lab,
        ),
        (
            "preprocessing",
            "original, zero-centered, normalized, decorrelated and whitened data, why all-positive inputs give a neuron gradients of one sign, and the effect of each on training",
            preprocessing::lab,
        ),
        (
            "init",
            "training curves of the same deep network under each initialization (tanh and ReLU)",
            init_lab::lab,
        ),
        (
            "learning-rate",
            "loss curves for very high, high, low and good rates; warmup at a large batch; cyclic; the linear scaling rule",
            lr_lab::lab,
        ),
        (
            "optimizers",
            "SGD, Momentum, Nesterov, Adagrad, RMSprop and Adam on 2-D surfaces, and training a network",
            optimizers::lab,
        ),
        (
            "regularization",
            "L1 and L2 paths (L1's exact zeros), dropout and the train/test gap, batch norm's train/eval mistake, stochastic depth, fractional max pooling",
            regularization::lab,
        ),
        (
            "augmentation",
            "a gallery of every augmentation on real samples, and baseline vs Mixup, Cutout and CutMix on one budget",
            augmentation::lab,
        ),
        (
            "fitting",
            "underfitting and overfitting across capacity, early stopping on the validation curve, a width sweep for double descent",
            fitting::lab,
        ),
        (
            "ensembles",
            "N independent models against one, and a snapshot ensemble from one run with warm restarts",
            ensembles::lab,
        ),
    ]
}

/// The real data of a lab run.
pub struct Data {
    /// The dataset and its training images, e.g. "digits (540 training images)".
    pub name: String,
    /// The dataset alone, e.g. "digits".
    pub set: String,
    pub prepared: Prepared,
    /// The training and test splits before preprocessing (the quick subset).
    raw: (regimen::data::Dataset, regimen::data::Dataset),
}

impl Data {
    /// Fashion-MNIST (from `data_dir` when given), or the embedded digits with `quick` or when
    /// Fashion-MNIST is not installed. Fashion-MNIST found but unreadable is an error, and so
    /// is a `data_dir` that does not hold it: neither falls back to the digits.
    fn load(quick: bool, data_dir: Option<&std::path::Path>) -> Result<Data> {
        if quick && data_dir.is_some() {
            bail!("--data-dir: --quick runs on the embedded digits; drop one of the two");
        }
        let splits = if quick {
            regimen::data::load("digits", None)?
        } else {
            match regimen::data::load("fashion-mnist", data_dir) {
                Ok(s) => s,
                Err(e)
                    if data_dir.is_none() && e.to_string().contains(" not found: looked for ") =>
                {
                    regimen::data::load("digits", None)?
                }
                Err(e) => return Err(anyhow::Error::from(e).context("the lab's data")),
            }
        };
        let (mut train, test) = (splits.train, splits.test);
        if quick {
            train = train.subset(&(0..train.len().min(600)).collect::<Vec<_>>());
        }
        let raw = (train.clone(), test.clone());
        let prepared = Prepared::new(train, test, PreprocessKind::Normalize, 0.1, 0)?;
        Ok(Data {
            name: format!("{} ({} training images)", splits.name, prepared.train.len()),
            set: splits.name.to_string(),
            prepared,
            raw,
        })
    }

    /// The raw training and test splits.
    pub fn raw(&self) -> Result<(regimen::data::Dataset, regimen::data::Dataset)> {
        Ok(self.raw.clone())
    }
}

/// The network the training comparisons use (before the output layer, which has one logit
/// per class).
pub const MLP: &str = "flatten,linear:128,relu,linear:classes";

/// Train [`MLP`] on `data` with optimizer `name` at a constant rate, batch 64: its history
/// and its loss every tenth of an epoch.
pub fn train_mlp(data: &Data, name: &str, lr: f64, epochs: usize) -> Result<Trained> {
    let cfg = OptimConfig::default();
    let sgd = |m: f64, n: bool| Sgd {
        momentum: m,
        dampening: 0.0,
        nesterov: n,
    };
    let optim = match name {
        "sgd" => Optim::new(sgd(0.0, false), cfg)?,
        "momentum" => Optim::new(sgd(0.9, false), cfg)?,
        "nesterov" => Optim::new(sgd(0.9, true), cfg)?,
        "adagrad" => Optim::new(Adagrad::default(), cfg)?,
        "rmsprop" => Optim::new(RmsProp::default(), cfg)?,
        "adam" => Optim::new(Adam::default(), cfg)?,
        other => bail!("unknown optimizer {other}"),
    };
    train(data, MLP, optim, Box::new(Constant(lr)), epochs, 64)
}

/// A trainer of model `spec` on `train` with SGD (momentum 0.9) at the constant rate `lr`,
/// batch 64, no loader threads; the initial weights and the data order both seeded by `seed`.
/// The experiments that compare one setting across runs start from it.
pub fn momentum_trainer(
    spec: &str,
    train: regimen::data::Dataset,
    epochs: usize,
    seed: u64,
    lr: f64,
) -> Result<Trainer> {
    let model = models::for_input(
        spec,
        train.image_shape,
        train.num_classes(),
        &mut Rng::new(seed),
    )?;
    let optim = Optim::new(
        Sgd {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        },
        OptimConfig::default(),
    )?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed,
        workers: 0,
        ..Default::default()
    };
    Ok(Trainer::new(
        model,
        optim,
        Box::new(Constant(lr)),
        fit,
        train,
    ))
}

/// What a lab training run gives back.
pub struct Trained {
    pub history: Vec<Record>,
    /// `(update, loss)` every few updates.
    pub steps: Vec<(u64, f32)>,
    /// The divergence message, when the loss went non-finite.
    pub diverged: Option<String>,
}

/// Collects the loss every `every` updates.
struct StepLosses {
    every: u64,
    out: std::sync::Arc<std::sync::Mutex<Vec<(u64, f32)>>>,
}

impl regimen::trainer::Callback for StepLosses {
    fn wants_step_values(&self, step: u64) -> bool {
        step.is_multiple_of(self.every)
    }
    fn on_step_end(
        &mut self,
        s: &regimen::train::StepEnd,
        _c: &mut regimen::trainer::Control,
    ) -> regimen::Result<()> {
        if let Some(l) = s.loss {
            self.out.lock().expect("not poisoned").push((s.step, l));
        }
        Ok(())
    }
}

/// Train model `spec` on `data` with `optim` and `schedule` (stepped per batch).
pub fn train(
    data: &Data,
    spec: &str,
    optim: Optim,
    schedule: Box<dyn regimen::schedule::Schedule>,
    epochs: usize,
    batch_size: usize,
) -> Result<Trained> {
    let p = &data.prepared;
    let model = models::for_input(
        spec,
        p.train.image_shape,
        p.train.num_classes(),
        &mut Rng::new(1),
    )?;
    let fit = FitConfig {
        epochs,
        batch_size,
        seed: 1,
        workers: 0,
        ..Default::default()
    };
    let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let every = (p.train.len().div_ceil(batch_size) as u64 / 10).max(1);
    let mut t = Trainer::new(model, optim, schedule, fit, p.train.clone())
        .with_validation(p.validation.clone())
        .callback(StepLosses {
            every,
            out: steps.clone(),
        });
    let diverged = match run_training(&mut t) {
        Ok(_) => None,
        Err(e @ regimen::Error::Diverged { .. }) => Some(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    let steps = steps.lock().expect("not poisoned").clone();
    Ok(Trained {
        history: t.history().to_vec(),
        steps,
        diverged,
    })
}

pub fn run(args: &LabArgs) -> Result<()> {
    let all = experiments();
    if args.name == "list" {
        for (name, about, _) in &all {
            say!("{name:<14} {about}");
        }
        return Ok(());
    }
    let chosen: Vec<_> = if args.name == "all" {
        all.iter().collect()
    } else {
        match all.iter().find(|e| e.0 == args.name) {
            Some(e) => vec![e],
            None => bail!(
                "unknown experiment {:?}: expected one of {}, all or list",
                args.name,
                all.iter().map(|e| e.0).collect::<Vec<_>>().join(", ")
            ),
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("lab").join(&args.name));
    crate::check_output_folder(&out, "report.md", "a lab report's folder")?;
    let data = Data::load(args.quick, args.data_dir.as_deref())?;
    let title = if chosen.len() == 1 {
        format!("regimen lab {}", chosen[0].0)
    } else {
        "regimen lab: the lecture's experiments".to_string()
    };
    // Ctrl-C: the experiments finished so far are in the report (it is rewritten after each).
    static FINISHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    {
        let report_md = out.join("report.md");
        let _ = ctrlc::set_handler(move || {
            match FINISHED.load(std::sync::atomic::Ordering::SeqCst) {
                0 => tell!("\ninterrupt: the lab stops before its first experiment finished; no report was written"),
                n => tell!(
                    "\ninterrupt: the lab stops; the {n} experiment{} finished before this one {} in {}",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "is" } else { "are" },
                    report_md.display()
                ),
            }
            std::process::exit(130);
        });
    }
    let mut report = Report::new(&out, &title)?;
    report.text(&format!(
        "Written by `regimen lab {}{}`; every number below comes from this run. The experiments that train run on {}.",
        args.name,
        if args.quick { " --quick" } else { "" },
        data.name
    ));
    for (name, _, f) in chosen {
        let start = std::time::Instant::now();
        tell!("lab {name}...");
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = (name, 0, Some(start));
        f(&mut report, args.quick, &data)?;
        tell!("lab {name}: {:.1} s", start.elapsed().as_secs_f64());
        // What is done so far stays readable if a later experiment is interrupted.
        report.write()?;
        FINISHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let report = if args.name == "all" {
        report.with_contents()
    } else {
        report
    };
    report.write()?;
    say!(
        "report: {} and {}",
        out.join("report.md").display(),
        out.join("report.html").display()
    );
    Ok(())
}
