//! `regimen`: the command-line program.

mod bench;
mod recipe;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use regimen::layer::Layer;
use regimen::train::{fit, FitConfig};
use regimen::{models, Rng};

#[derive(Parser)]
#[command(
    name = "regimen",
    version,
    about = "Train neural networks natively in Rust: every technique of the lecture, explicit forward/backward layers, fast kernels."
)]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a built-in model on the embedded 8x8 digits with mini-batch SGD (the default command).
    Train(TrainArgs),
    /// Print a built-in model's layers: output shapes, parameters and FLOPs per sample.
    Summary {
        /// One of: digits-mlp, digits-cnn, mlp, cnn.
        #[arg(long, default_value = "cnn")]
        model: String,
    },
    /// Time training steps of the BENCH.md workloads (regimen's side of bench/compare).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// One of: digits-mlp, digits-cnn.
    #[arg(long, default_value = "digits-cnn")]
    model: String,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Fraction of the data held out for testing.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    optim: recipe::OptimArgs,
}

fn train(args: &TrainArgs) -> Result<()> {
    if args.batch_size == 0 {
        anyhow::bail!("invalid --batch-size 0: must be at least 1");
    }
    let mut rng = Rng::new(args.seed);
    let (mut model, input) = models::by_name(&args.model, &mut rng)?;
    if input != [1, 8, 8] {
        anyhow::bail!("model {} takes {:?} images; `regimen train` trains on the embedded 8x8 digits: use digits-mlp or digits-cnn", args.model, input);
    }
    let data = regimen::data::digits()?;
    let (mut train_set, mut test_set) = data.split(args.test_fraction, args.seed)?;
    // Build everything that can fail on a bad flag before printing anything.
    let mut optim = recipe::optimizer(&args.optim)?;
    let per_epoch = train_set.len().div_ceil(args.batch_size);
    let (mut schedule, unit) = recipe::schedule(&args.optim, args.epochs, per_epoch)?;
    let penalty = recipe::penalty(&args.optim)?;
    // Zero-center and normalize with the training split's statistics only.
    let (mean, std) = train_set.pixel_mean_std();
    train_set.normalize(mean, std);
    test_set.normalize(mean, std);
    println!("{}", model.summary(&input)?);
    let o = &args.optim;
    println!(
        "training {} on digits: {} train / {} test images, {} epochs, batch {}, {} lr {} schedule {}{}",
        args.model,
        train_set.len(),
        test_set.len(),
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
        ..Default::default()
    };
    println!(
        "{:>5} {:>10} {:>9} {:>10} {:>9} {:>10} {:>7}",
        "epoch", "train loss", "train acc", "test loss", "test acc", "lr", "time"
    );
    let history = fit(
        &mut model,
        &train_set,
        &test_set,
        &cfg,
        &mut optim,
        schedule.as_mut(),
        |s| {
            println!(
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
    )?;
    if let Some(last) = history.last() {
        println!(
            "final test accuracy {:.2}% (generalization gap {:.2} points)",
            100.0 * last.test_acc,
            100.0 * (last.train_acc - last.test_acc)
        );
    }
    Ok(())
}

fn run() -> Result<()> {
    let mut cli = Cli::parse();
    if cli.command.is_none() {
        // `regimen` alone runs `regimen train` with its defaults.
        cli = Cli::parse_from(std::env::args().chain(["train".to_string()]));
    }
    if let Some(t) = cli.threads {
        regimen::set_threads(t);
    }
    match cli.command {
        None => unreachable!("defaulted to train above"),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Summary { model }) => {
            let mut rng = Rng::new(0);
            let (mut m, input) = models::by_name(&model, &mut rng)?;
            println!("{model}: {}", m.describe());
            println!("{}", m.summary(&input).context("building the summary")?);
            Ok(())
        }
        Some(Command::Bench(args)) => bench::run(&args),
    }
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
