//! `regimen`: the command-line program.

#[macro_use]
mod out;
mod bench;
mod config;
mod data_cmd;
mod recipe;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use regimen::layer::Layer;
use std::sync::Arc;

use regimen::data::{Pipeline, PreprocessKind, Preprocessor};
use regimen::loss::CrossEntropy;
use regimen::train::{evaluate, fit, FitConfig};
use regimen::{models, Rng};

#[derive(Parser)]
#[command(
    name = "regimen",
    version,
    about = "Train neural networks natively in Rust: every technique of the lecture, explicit forward/backward layers, fast kernels."
)]
#[command(args_override_self = true)]
struct Cli {
    /// CPU threads for the numeric work, 1 to 1024 (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Train a built-in model on a dataset (default: the embedded 8x8 digits; the default command).
    #[command(args_override_self = true, allow_negative_numbers = true)]
    Train(TrainArgs),
    /// Print a built-in model's layers: output shapes, parameters and FLOPs per sample.
    Summary {
        /// One of: digits-mlp, digits-cnn, mlp, cnn.
        #[arg(long, default_value = "cnn")]
        model: String,
    },
    /// Time training steps of the benchmark workloads (bench/README.md; regimen's side of bench/compare).
    Bench(bench::BenchArgs),
    /// Evaluate a checkpoint written by `regimen train --save` on a dataset's test split.
    Eval {
        /// The checkpoint file.
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// The dataset (default: the one the checkpoint was trained on).
        #[arg(long)]
        dataset: Option<String>,
        /// Directory holding the dataset's files (else $REGIMEN_DATA, else /usr/share/datasets/NAME).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Inspect datasets and augmentation pipelines.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// digits-mlp, digits-cnn, mlp or cnn (default: digits-cnn on digits, cnn otherwise).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    source: data_cmd::Source,
    /// Preprocessing fitted on the training split: none, center, normalize, mean-image,
    /// channel-mean, per-channel, pca:K or whiten:K.
    #[arg(long, default_value = "normalize")]
    preprocess: String,
    /// Augmentation pipeline, like crop=2,flip,cutmix=1.0 (none by default).
    #[arg(long, default_value = "none")]
    augment: String,
    /// Label smoothing of the cross-entropy, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Background threads preparing batches on the host, 0 to 64 (0: in the training thread).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Passes over the training set, 1 to 1,000,000.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Images per training step (mini-batch size), 1 to 65,536.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Seed of everything random: initialization, validation split, shuffling, dropout masks,
    /// augmentation draws. The same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    optim: recipe::OptimArgs,
    /// Save the trained model (and its preprocessing) to this safetensors file.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// A TOML file of these flags (`lr = 0.05`, `schedule = "cosine"`, ...); flags given here win.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Where to train: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Matrix products in f32, bf16 or f16 (mixed precision: master weights, gradients and
    /// optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Record one training step as a CUDA graph and replay it for every batch (GPU only;
    /// the training set then lives on the GPU).
    #[arg(long)]
    graph: bool,
    /// On a GPU, build batches on the host (with every augmentation) instead of on the GPU.
    #[arg(long)]
    host_data: bool,
}

fn train(args: &TrainArgs) -> Result<()> {
    check_range("--batch-size", args.batch_size, 1, 65_536)?;
    check_range("--epochs", args.epochs, 1, 1_000_000)?;
    check_range("--workers", args.workers, 0, 64)?;
    // The output file is checked before any training: a run's result must not be lost to a
    // missing folder at the end.
    if let Some(path) = &args.save {
        check_writable(path)?;
    }
    // Every flag is checked before any data is read (the schedule's syntax and values here;
    // only the warmup length against the real number of steps waits for the data).
    let preprocess = PreprocessKind::parse(&args.preprocess)?;
    let augment = Pipeline::parse(&args.augment)?;
    let mut optim = recipe::optimizer(&args.optim)?;
    let penalty = recipe::penalty(&args.optim)?;
    let ls = CrossEntropy::with_label_smoothing(args.label_smoothing)?;
    let precision = bench::parse_precision(&args.precision)?;
    let device = regimen::Device::parse(&args.device)?;
    if args.graph && device == regimen::Device::Cpu {
        anyhow::bail!("--graph records a CUDA graph: it needs --device cuda");
    }
    // On a GPU the training set lives there and batches are built by a kernel when the
    // augmentation allows it (crop and flip).
    let device_data =
        device != regimen::Device::Cpu && !args.host_data && augment.crop_flip().is_some();
    if args.graph && !device_data {
        anyhow::bail!("--graph builds batches on the GPU: it takes --augment with crop and flip only, and not --host-data");
    }
    let model_name = args.model.clone().unwrap_or_else(|| {
        if args.source.dataset == "digits" {
            "digits-cnn".into()
        } else {
            "cnn".into()
        }
    });
    models::ModelSpec::parse(&model_name).context("--model")?;
    recipe::schedule(&args.optim, args.epochs.max(1), 1 << 20, false)?;
    let splits = args.source.load()?;
    let (mut train_set, mut test_set) = (splits.train, splits.test);
    // Reduce-on-plateau decides on held-out data: a validation split of the training set, so
    // that the test set stays untouched by training decisions.
    let mut validation = None;
    if args.optim.schedule.starts_with("plateau") {
        let (t, v) = train_set.split(0.1, args.seed)?;
        train_set = t;
        validation = Some(v);
    }
    // Statistics from the training split only, applied unchanged to the test split.
    let pre = Preprocessor::fit(preprocess, &train_set)?;
    pre.apply(&mut train_set)?;
    augment.check_image_shape(train_set.image_shape)?;
    pre.apply(&mut test_set)?;
    if let Some(v) = &mut validation {
        pre.apply(v)?;
    }
    let per_epoch = train_set.len().div_ceil(args.batch_size);
    let (mut schedule, unit) = recipe::schedule(&args.optim, args.epochs, per_epoch, true)?;
    if args.optim.accumulate > args.epochs * per_epoch {
        anyhow::bail!(
            "invalid --accumulate {}: the run has only {} batches ({} epochs of {per_epoch}), so no update would ever be applied",
            args.optim.accumulate,
            args.epochs * per_epoch,
            args.epochs
        );
    }
    let mut rng = Rng::new(args.seed);
    let mut model = models::for_input(
        &model_name,
        train_set.image_shape,
        train_set.num_classes(),
        &mut rng,
    )?;
    regimen::layer::to_device(&mut model, device);
    let (input_shape, classes) = (train_set.image_shape, train_set.num_classes());
    let input = input_shape.to_vec();
    say!("{}", model.summary(&input)?);
    let o = &args.optim;
    say!(
        "training {model_name} on {} ({}): {} train / {} test images, preprocess {}, augment {}, {} epochs, batch {}, {} lr {} schedule {}{}",
        splits.name,
        splits.source,
        train_set.len(),
        test_set.len(),
        args.preprocess,
        args.augment,
        args.epochs,
        args.batch_size,
        optim.name(),
        o.lr,
        o.schedule,
        if o.warmup > 0 { format!(" after {} warmup steps", o.warmup) } else { String::new() }
    );
    let cfg = FitConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        seed: args.seed,
        unit,
        penalty,
        label_smoothing: ls.label_smoothing,
        augment,
        workers: args.workers,
        progress: true,
        device,
        precision,
        device_data,
        graph: args.graph,
        ..Default::default()
    };
    say!(
        "{:>5} {:>10} {:>9} {:>10} {:>9} {:>10} {:>7}",
        "epoch",
        "train loss",
        "train acc",
        if validation.is_some() {
            "val loss"
        } else {
            "test loss"
        },
        if validation.is_some() {
            "val acc"
        } else {
            "test acc"
        },
        "lr",
        "time"
    );
    let history = fit(
        &mut model,
        Arc::new(train_set),
        validation.as_ref().unwrap_or(&test_set),
        &cfg,
        &mut optim,
        schedule.as_mut(),
        |s| {
            say!(
                "{:>5} {:>10.4} {:>8.2}% {:>10.4} {:>8.2}% {:>10.3e} {:>6.2}s",
                s.epoch,
                s.train_loss,
                100.0 * s.train_acc,
                s.test_loss,
                100.0 * s.test_acc,
                s.lr,
                s.seconds
            );
        },
    );
    let save = |model: &mut regimen::layers::Sequential| -> Result<()> {
        if let Some(path) = &args.save {
            let [c, h, w] = input_shape;
            let meta = std::collections::BTreeMap::from([
                ("model".to_string(), model_name.clone()),
                ("dataset".to_string(), splits.name.clone()),
                ("input_shape".to_string(), format!("{c},{h},{w}")),
                ("classes".to_string(), classes.to_string()),
            ]);
            regimen::checkpoint::save(path, model, Some(&pre), meta)?;
            say!(
                "saved the model and its preprocessing to {}",
                path.display()
            );
        }
        Ok(())
    };
    let history = match history {
        Ok(h) => h,
        // A diverged run keeps its last finite model: save that one, then report.
        Err(e @ regimen::Error::Diverged { .. }) => {
            save(&mut model)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    save(&mut model)?;
    if let Some(last) = history.last() {
        let test_acc = match validation {
            Some(_) => evaluate(&mut model, &test_set, 256, device)?.1,
            None => last.test_acc,
        };
        say!(
            "final test accuracy {:.2}% (generalization gap {:.2} points)",
            100.0 * test_acc,
            100.0 * (last.train_acc - test_acc)
        );
    }
    Ok(())
}

/// `regimen eval`: rebuild the model named in the checkpoint, load it, preprocess the test
/// split with the stored statistics, and report loss and accuracy.
fn eval_checkpoint(
    path: &std::path::Path,
    dataset: Option<String>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<()> {
    let (_, meta) = regimen::io::read_safetensors(path)?;
    let field = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a regimen train checkpoint (no '{k}' metadata)",
                path.display()
            )
        })
    };
    let dims: Vec<usize> = field("input_shape")?
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    let classes: usize = field("classes")?.parse()?;
    if dims.len() != 3 {
        anyhow::bail!("{}: bad input_shape metadata", path.display());
    }
    // The metadata is checked against the tensors in the file before the model is built: a
    // file claiming a huge input or class count would otherwise allocate it.
    let name = field("model")?;
    let input = [dims[0], dims[1], dims[2]];
    let want = models::param_count(&name, input, classes)?;
    let (tensors, _) = regimen::io::read_safetensors(path)?;
    let have: usize = tensors
        .iter()
        .filter(|(n, _, _)| !n.starts_with("preprocess.") && !n.contains("running_"))
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    if want != have {
        anyhow::bail!(
            "{}: the metadata describes {name} for {input:?} inputs and {classes} classes ({want} parameters), but the file holds {have}",
            path.display()
        );
    }
    drop(tensors);
    let mut model = models::for_input(&name, input, classes, &mut Rng::new(0))?;
    let loaded = regimen::checkpoint::load(path, &mut model)?;
    let dataset = match dataset {
        Some(d) => d,
        None => field("dataset")?,
    };
    let source = data_cmd::Source { dataset, data_dir };
    let mut test = source.load()?.test;
    if let Some(p) = &loaded.preprocess {
        p.apply(&mut test)?;
    }
    if test.image_shape != input {
        anyhow::bail!(
            "the checkpoint takes {input:?} inputs, {} gives {:?}",
            source.dataset,
            test.image_shape
        );
    }
    if test.num_classes() != classes {
        anyhow::bail!(
            "the checkpoint has {classes} classes, {} has {}",
            source.dataset,
            test.num_classes()
        );
    }
    let (loss, acc) = evaluate(&mut model, &test, 256, regimen::Device::Cpu)?;
    say!(
        "{} on the {} test split ({} images): loss {loss:.4}, accuracy {:.2}%",
        path.display(),
        source.dataset,
        test.len(),
        100.0 * acc
    );
    Ok(())
}

fn run() -> Result<()> {
    let expanded = config::expand(std::env::args().collect())?;
    let mut cli = parse(expanded.args, &expanded.from_file)?;
    if cli.command.is_none() {
        // `regimen` alone runs `regimen train` with its defaults.
        cli = parse(std::env::args().chain(["train".to_string()]).collect(), &[])?;
    }
    if let Some(t) = cli.threads {
        check_range("--threads", t, 1, 1024)?;
        regimen::set_threads(t);
    }
    match cli.command {
        None => unreachable!("defaulted to train above"),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Summary { model }) => {
            let mut rng = Rng::new(0);
            let (mut m, input) = models::by_name(&model, &mut rng)?;
            say!("{model}: {}", m.describe());
            say!("{}", m.summary(&input).context("building the summary")?);
            Ok(())
        }
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Data(cmd)) => data_cmd::run(&cmd),
        Some(Command::Eval {
            checkpoint,
            dataset,
            data_dir,
        }) => eval_checkpoint(&checkpoint, dataset, data_dir),
    }
}

/// Parse the command line; help and version print and exit as usual. A bad value that came
/// from a config file is reported with the file and the key, not only the flag.
fn parse(args: Vec<String>, from_file: &[(String, String, String)]) -> Result<Cli> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => {
                    a.split_whitespace().next().unwrap_or("").to_string()
                }
                _ => String::new(),
            };
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            match from_file.iter().find(|(flag, _, _)| *flag == arg) {
                Some((_, key, file)) => anyhow::bail!("config {file}: {key}: {first}"),
                None if e.kind() == ErrorKind::UnknownArgument => anyhow::bail!(
                    "{first} (a negative number goes after '=', like --lr=-0.1; see --help)"
                ),
                None => anyhow::bail!("{first} (see --help)"),
            }
        }
    }
}

/// `value` must be in `[lo, hi]`; the error names the flag.
fn check_range(flag: &str, value: usize, lo: usize, hi: usize) -> Result<()> {
    if value < lo || value > hi {
        anyhow::bail!("invalid {flag} {value}: must be from {lo} to {hi}");
    }
    Ok(())
}

/// That a file can be written at `path` (its folder exists and takes a new file), before the
/// work that produces it starts.
fn check_writable(path: &std::path::Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if path.is_dir() {
        anyhow::bail!("cannot save to {}: it is a folder", path.display());
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot save to {}: the folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".regimen-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| anyhow::anyhow!("cannot save to {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Errors are one line on stderr and exit status 2 (no backtrace: they are the user's input).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
