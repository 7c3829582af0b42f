//! `regimen`: the command-line program.

#[macro_use]
mod out;
mod bench;
mod config;
mod data_cmd;
mod lab;
mod plot;
mod predict;
mod recipe;
mod sweep;
mod train_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use regimen::layer::Layer;

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
    Train(train_cmd::TrainArgs),
    /// Print a built-in model's layers: output shapes, parameters and FLOPs per sample.
    Summary {
        /// A built-in model (digits-mlp, digits-cnn, mlp, cnn, deep-mlp, resnet, ...) or a
        /// model spec, as `train --model` takes it.
        #[arg(long, default_value = "cnn")]
        model: String,
        /// The shape of one input, C,H,W (default: 1,8,8 for digits-*, 3,32,32 for resnet,
        /// else 1,28,28).
        #[arg(long)]
        input: Option<String>,
        /// The number of classes.
        #[arg(long, default_value_t = 10)]
        classes: usize,
    },
    /// Time training steps of the benchmark workloads (bench/README.md; regimen's side of bench/compare).
    Bench(bench::BenchArgs),
    /// Evaluate checkpoints of `regimen train` on a dataset's test split: one, or several as
    /// an ensemble (their probabilities averaged), like the snapshots of a run.
    Eval {
        /// Checkpoint files or run folders (a run folder means its best checkpoint).
        checkpoints: Vec<std::path::PathBuf>,
        /// A checkpoint (the same as a positional one; may be repeated).
        #[arg(long)]
        checkpoint: Vec<std::path::PathBuf>,
        /// The dataset (default: the one the checkpoint was trained on).
        #[arg(long)]
        dataset: Option<String>,
        /// Directory holding the dataset's files (else $REGIMEN_DATA, else /usr/share/datasets/NAME).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Classify images (PNG or IDX files) with a checkpoint or an ensemble: the class and the
    /// probabilities of each, as CSV or JSON.
    Predict(predict::PredictArgs),
    /// Inspect datasets and augmentation pipelines.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// The learning-rate range test (Smith): the loss while the rate grows exponentially over a
    /// few hundred steps, with two suggestions; takes every `train` flag and config.
    #[command(args_override_self = true, allow_negative_numbers = true)]
    LrFind(train_cmd::LrFindArgs),
    /// Random search with successive halving over a space of train settings; a leaderboard,
    /// plots and the best config.
    Sweep(sweep::SweepArgs),
    /// The lecture's experiments with plots and a report: `regimen lab list` names them,
    /// `regimen lab NAME` runs one, `regimen lab all` runs them all into one report.
    Lab(lab::LabArgs),
}

/// `regimen --epochs 3` means `regimen train --epochs 3`: without a command, the first flag
/// that is not a global one (`--threads N`) starts `train`'s.
fn with_default_command(mut args: Vec<String>) -> Vec<String> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--threads" {
            i += 2;
        } else if a.starts_with("--threads=") {
            i += 1;
        } else {
            break;
        }
    }
    let train_flag = args
        .get(i)
        .is_some_and(|a| a.starts_with("--") && !matches!(a.as_str(), "--help" | "--version"));
    if train_flag {
        args.insert(i, "train".to_string());
    }
    args
}

fn run() -> Result<()> {
    let expanded = config::expand(with_default_command(std::env::args().collect()))?;
    let origins = expanded.from_file.clone();
    run_expanded(expanded).map_err(|e| blame_config(e, &origins))
}

/// An error about a flag that only the config file set (`invalid --threads 0: ...`) names the
/// file and its key, as clap's own errors of such flags do.
fn blame_config(e: anyhow::Error, origins: &[(String, String, String)]) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.starts_with("config ") {
        return e;
    }
    let command_line: Vec<String> = std::env::args().collect();
    let on_command_line = |flag: &str| {
        command_line
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let named = |flag: &str| {
        text.starts_with(&format!("invalid {flag} "))
            || text.starts_with(&format!("invalid {flag}="))
            || text.contains(&format!("for '{flag} "))
            || text.contains(&format!("for '{flag}'"))
    };
    match origins
        .iter()
        .find(|(flag, _, _)| named(flag) && !on_command_line(flag))
    {
        Some((_, key, file)) => anyhow::anyhow!("config {file}: {key}: {text}"),
        None => e,
    }
}

fn run_expanded(expanded: config::Expanded) -> Result<()> {
    let mut cli = parse(expanded.args, &expanded.from_file)?;
    if cli.command.is_none() {
        // `regimen` alone runs `regimen train` with its defaults.
        cli = parse(std::env::args().chain(["train".to_string()]).collect(), &[])?;
    }
    // Several ranks under mpirun or srun: only training (and its benchmark) runs on them.
    let launched = regimen::dist::launched_ranks().unwrap_or(1);
    if launched > 1 {
        match &cli.command {
            Some(Command::Train(_)) | Some(Command::Bench(_)) => {}
            _ => anyhow::bail!(
                "started with {launched} ranks: only `regimen train` and `regimen bench` run \
                 data-parallel; start the others as one process"
            ),
        }
        let comm = regimen::dist::init()?;
        if comm.rank() != 0 {
            out::quiet();
        }
    }
    match cli.threads {
        Some(t) => {
            check_range("--threads", t, 1, 1024)?;
            regimen::set_threads(t);
        }
        // Ranks on one machine share its cores.
        None if launched > 1 => regimen::set_threads(threads_per_rank()),
        None => {}
    }
    // The command runs on a thread of the compute pool (see `regimen::on_pool`).
    regimen::on_pool(|| command(cli.command))
}

fn command(command: Option<Command>) -> Result<()> {
    match command {
        None => unreachable!("defaulted to train above"),
        Some(Command::Train(mut args)) => {
            args.source.absolute_dir();
            train_cmd::train(&args)
        }
        Some(Command::Summary {
            model,
            input,
            classes,
        }) => {
            let mut rng = Rng::new(0);
            check_range("--classes", classes, 2, 1_000_000)?;
            let shape = match input {
                Some(text) => {
                    let dims: Vec<usize> = text
                        .split(',')
                        .map(|d| d.trim().parse::<usize>())
                        .collect::<std::result::Result<_, _>>()
                        .ok()
                        .filter(|d: &Vec<usize>| d.len() == 3 && d.iter().all(|&x| x > 0))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "invalid --input {text:?}: expected C,H,W, three whole numbers > 0, like 3,32,32"
                            )
                        })?;
                    [dims[0], dims[1], dims[2]]
                }
                None => models::default_input(&model),
            };
            let (mut m, input) = (
                models::for_input(&model, shape, classes, &mut rng)?,
                shape.to_vec(),
            );
            say!("{model}: {}", m.describe());
            say!("{}", m.summary(&input).context("building the summary")?);
            Ok(())
        }
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Data(cmd)) => data_cmd::run(&cmd),
        Some(Command::Eval {
            mut checkpoints,
            checkpoint,
            dataset,
            data_dir,
        }) => {
            checkpoints.extend(checkpoint);
            predict::eval(&checkpoints, dataset, data_dir)
        }
        Some(Command::Predict(args)) => predict::predict(&args),
        Some(Command::Lab(args)) => lab::run(&args),
        Some(Command::LrFind(mut args)) => {
            args.train.source.absolute_dir();
            train_cmd::lr_find(&args)
        }
        Some(Command::Sweep(args)) => sweep::run(&args),
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
        // `regimen data` alone: the subcommands are the answer, on stderr, status 2.
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => {
                    a.split_whitespace().next().unwrap_or("").to_string()
                }
                _ => String::new(),
            };
            let text = e.to_string();
            // clap's message on one line: its first line, then what it lists under it (the
            // missing arguments, a similar flag) without its usage and help pointers.
            let mut lines = text.lines().map(str::trim).filter(|l| {
                !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
            });
            let first = lines.next().unwrap_or("").trim_start_matches("error: ");
            let rest: Vec<&str> = lines.collect();
            let message = match (first.ends_with(':'), rest.is_empty()) {
                (_, true) => first.to_string(),
                (true, false) => format!("{first} {}", rest.join(", ")),
                (false, false) => format!("{first} ({})", rest.join("; ")),
            };
            // A flag from the config file, or a value there that clap took for an argument.
            // The value clap refused: a flag given both in the file and on the command line is
            // the file's fault only when the file holds that value.
            let bad_value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => Some(v.clone()),
                _ => None,
            };
            let origin = from_file.iter().find(|(flag, key, _)| {
                (*flag == arg
                    && bad_value.as_ref().is_none_or(|v| {
                        key.ends_with(&format!("= {v}")) || key.ends_with(&format!("= \"{v}\""))
                    }))
                    || (!arg.starts_with("--")
                        && !arg.is_empty()
                        && (key.ends_with(&format!("= \"{arg}\""))
                            || key.ends_with(&format!("= {arg}"))))
            });
            let negative = arg.starts_with('-')
                && arg[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.');
            match origin {
                Some((_, key, file)) => anyhow::bail!("config {file}: {key}: {message}"),
                None if e.kind() == ErrorKind::UnknownArgument && negative => anyhow::bail!(
                    "{message} (a negative number goes after '=', like --lr=-0.1; see --help)"
                ),
                None => anyhow::bail!("{message} (see --help)"),
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

/// An output folder a command may write into: absent, empty, or one it wrote before (holding
/// `marker`). Another folder (a train run's, one of the user's files) is refused, so that a
/// report or a sweep never mixes into it.
pub fn check_output_folder(dir: &std::path::Path, marker: &str, what: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("--out {}: a file, not a folder", dir.display());
    }
    if dir.is_dir()
        && !dir.join(marker).exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "--out {}: the folder holds other files (no {marker}: not {what}); give a new or empty folder",
            dir.display()
        );
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
            "cannot save to {}: {}",
            path.display(),
            if dir.exists() {
                format!("{} is not a folder", dir.display())
            } else {
                format!("the folder {} does not exist", dir.display())
            }
        );
    }
    let probe = dir.join(format!(".regimen-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| anyhow::anyhow!("cannot save to {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Errors are one line on stderr and exit status 2 (no backtrace: they are the user's input).
/// The cores of this machine over the ranks the launcher put on it (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's `MPI_LOCALNRANKS`, Slurm's
/// `SLURM_STEP_TASKS_PER_NODE`), at least one.
fn threads_per_rank() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_STEP_TASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| {
        let v = std::env::var(v).ok()?;
        // Slurm writes "2(x3)" for three nodes of two.
        v.split('(').next()?.trim().parse::<usize>().ok()
    })
    .unwrap_or(1);
    (cores / local.max(1)).max(1)
}

fn main() -> std::process::ExitCode {
    let result = run();
    let world = regimen::dist::world();
    match result {
        Ok(()) => {
            regimen::dist::finish();
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // Under a launcher the error names its rank; the launcher then ends the others.
            if world.size() > 1 {
                tell!("error: rank {} of {}: {e:#}", world.rank(), world.size());
            } else {
                tell!("error: {e:#}");
            }
            std::process::ExitCode::from(2)
        }
    }
}
