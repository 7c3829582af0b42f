//! `regimen train`: flags and/or a TOML config in, a run folder out.
//!
//! The run folder (`--out DIR`, default `runs/DATE-TIME-MODEL`) holds `config.toml` (the
//! resolved config: every flag's value, reusable with `--config`), `metrics.csv` (one row per
//! epoch), `checkpoints/last.safetensors` (the whole run, after every epoch and at Ctrl-C),
//! `checkpoints/best.safetensors` (the best validation epoch, or the best --monitor epoch with
//! --early-stopping), `checkpoints/snapshot-epoch-E.safetensors`
//! (`--snapshots`), `loss.png`, `accuracy.png`, `lr.png`, TensorBoard event files and, at the
//! end, `summary.json`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use regimen::data::{Pipeline, PreprocessKind};
use regimen::loss::CrossEntropy;
use regimen::tensorboard::TensorBoard;
use regimen::train::{FitConfig, StepEnd};
use regimen::trainer::{
    BestCheckpoint, Callback, Control, EarlyStopping, Ending, EpochEnd, MetricsCsv, Mode, Prepared,
    Record, SnapshotEnsemble, Trainer,
};
use regimen::{models, Rng};

use crate::plot::{self, Plot, Series};
use crate::{bench, check_range, check_writable, data_cmd, recipe};

#[derive(clap::Args, serde::Serialize)]
pub struct TrainArgs {
    /// A built-in model (digits-mlp, digits-cnn, mlp, cnn, resnet[:N[:WIDTH[:P]]],
    /// deep-mlp[:DEPTH[:WIDTH]]) or a model spec like
    /// conv:32,bn,relu,maxpool:2,flatten,linear:classes (see the README); options init=NAME and
    /// activation=NAME. Default: digits-cnn on digits, cnn otherwise.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub source: data_cmd::Source,
    /// Preprocessing fitted on the training split: none, center, normalize, mean-image,
    /// channel-mean, per-channel, pca:K or whiten:K.
    #[arg(long, default_value = "normalize")]
    pub preprocess: String,
    /// Augmentation pipeline, like crop=2,flip,cutmix=1.0 (none by default).
    #[arg(long, default_value = "none")]
    pub augment: String,
    /// Label smoothing of the cross-entropy, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Background threads preparing batches on the host, 0 to 64 (0: in the training thread).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Passes over the training set, 1 to 1,000,000.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Images per training step (mini-batch size), 1 to 65,536.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of everything random: initialization, validation split, shuffling, dropout masks,
    /// augmentation draws. The same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The fraction of the training set held out for validation, in [0, 0.9] (0: none; early
    /// stopping on val_* and reduce-on-plateau then have nothing to decide on, and the best
    /// checkpoint follows the training accuracy).
    #[arg(long, default_value_t = 0.1)]
    pub validation: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: recipe::OptimArgs,
    /// Stop when --monitor has not improved for this many epochs (early stopping).
    #[arg(long)]
    pub early_stopping: Option<usize>,
    /// The metric early stopping follows: val_loss, val_acc, train_loss, train_acc or gap.
    /// With --early-stopping, the best checkpoint, the best epoch reported and --restore-best
    /// follow it too; without, they follow the validation accuracy (the training accuracy
    /// with --validation 0).
    #[arg(long, default_value = "val_loss")]
    pub monitor: String,
    /// The smallest change of --monitor that counts as an improvement.
    #[arg(long, default_value_t = 0.0)]
    pub min_delta: f64,
    /// At the end, put back the weights of the best epoch (with --early-stopping).
    #[arg(long)]
    pub restore_best: bool,
    /// Keep a snapshot at the end of every learning-rate cycle (snapshot ensembles: use a
    /// cyclic or restarts schedule, then `regimen eval` the snapshots together).
    #[arg(long)]
    pub snapshots: bool,
    /// TensorBoard scalars of the loss, learning rate and gradient norm every N updates.
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    /// The run folder (default: a new folder under runs/).
    #[arg(long)]
    #[serde(skip)]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (exactly where it stopped);
    /// only --epochs (to lengthen it), --threads, --workers, --device and --data-dir (the same
    /// files, moved) may be given with it.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Also save the trained model (and its preprocessing) to this safetensors file.
    #[arg(long)]
    #[serde(skip)]
    pub save: Option<PathBuf>,
    /// A TOML file of these flags (`lr = 0.05`, `schedule = "cosine"`, ...); flags given here win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Check the flags, config and specs, then stop: no data is read, nothing is written
    /// (what `sweep` asks of each trial before it starts any).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub check_only: bool,
    /// Where to train: cpu, cuda (GPU 0; under several ranks, GPU local rank mod GPUs) or
    /// cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Matrix products in f32, bf16 or f16 (mixed precision: master weights, gradients and
    /// optimizer state stay f32). bf16 also keeps and hands on the activations of
    /// convolutions, batch norm and linear layers with their ReLU in bf16.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Record one training step as a CUDA graph and replay it for every batch (GPU only, one
    /// process; the training set then lives on the GPU).
    #[arg(long)]
    pub graph: bool,
    /// On a GPU, build batches with the host loader instead of on the GPU (both run every
    /// augmentation; their random draws differ).
    #[arg(long)]
    pub host_data: bool,
    /// Data-parallel runs (under mpirun or srun): batch-norm statistics over every rank's
    /// batch, instead of each rank's own.
    #[arg(long)]
    pub sync_bn: bool,
    /// The linear scaling rule: --lr is the rate for batches of this many samples, and the run
    /// uses it times (its own batch x ranks x --accumulate) / this (Goyal et al., 2017; with
    /// --warmup, their gradual warmup).
    #[arg(long)]
    pub lr_batch: Option<usize>,
    /// Data-parallel runs: the gradients are summed over the ranks in buckets of this many
    /// MiB, each sent as soon as backward has filled it (0.01 to 1024).
    #[arg(long, default_value_t = 1.0)]
    pub bucket_mb: f64,
}

/// The flags `--resume` takes from the command line; the rest comes from the run's config.
/// `--data-dir` may change: the same files may sit elsewhere (another machine, a moved folder).
pub const RESUME_FLAGS: &[&str] = &[
    "--epochs",
    "--threads",
    "--workers",
    "--device",
    "--data-dir",
];

/// The run folder of `train` or `lr-find`: the one given (`--out`, `--resume`) or a new one
/// under runs/; checked, and created for a new run.
fn prepare_run_folder(args: &TrainArgs, find: bool, model_name: &str) -> Result<PathBuf> {
    let out = match (&args.resume, &args.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) if find => new_run_dir(&format!("lr-find-{model_name}"))?,
        (None, None) => new_run_dir(model_name)?,
    };
    let ckpt_dir = out.join("checkpoints");
    let last = ckpt_dir.join("last.safetensors");
    if find {
        if args.resume.is_some() {
            bail!("lr-find starts from a new model: give no --resume");
        }
        std::fs::create_dir_all(&out)
            .with_context(|| format!("creating the folder {}", out.display()))?;
    } else if args.resume.is_none() {
        if last.exists() {
            bail!(
                "{} already holds a run: continue it with --resume {}, or give another --out",
                out.display(),
                out.display()
            );
        }
        // A folder of other files (a project, a dataset): a run would overwrite its
        // config.toml and mix its files with them. Reused: a run's folder that has no
        // checkpoint yet (its `checkpoints/` is there: an error or a kill came first), and a
        // folder that holds only the config this run was given.
        let started = ckpt_dir.is_dir();
        if let (false, Ok(entries)) = (started, std::fs::read_dir(&out)) {
            let given = crate::config::GIVEN.get();
            let other = entries
                .flatten()
                .find(|e| std::fs::canonicalize(e.path()).ok().as_ref() != given);
            if let Some(e) = other {
                bail!(
                    "{} is not empty ({} and maybe more) and holds no run: give a new or empty folder to --out",
                    out.display(),
                    e.file_name().to_string_lossy()
                );
            }
        }
        std::fs::create_dir_all(&ckpt_dir)
            .with_context(|| format!("creating the run folder {}", out.display()))?;
    } else if !last.is_file() {
        bail!(
            "--resume {}: no checkpoint {} (is this a run folder of regimen train?)",
            out.display(),
            last.display()
        );
    }
    check_writable(&out.join("metrics.csv"))?;
    Ok(out)
}

/// `YYYYmmdd-HHMMSS` in UTC, for run folder names.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A new run folder under `runs/` (a suffix when the name is taken).
fn new_run_dir(model: &str) -> Result<PathBuf> {
    let name: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let base = PathBuf::from("runs").join(format!("{}-{name}", timestamp()));
    for n in 0..1000 {
        let dir = if n == 0 {
            base.clone()
        } else {
            PathBuf::from(format!("{}-{n}", base.display()))
        };
        if !dir.exists() {
            return Ok(dir);
        }
    }
    bail!("cannot find a free run folder name like {}", base.display())
}

/// `regimen lr-find`: the learning-rate range test on the model, data and optimizer of a
/// `train` config.
#[derive(clap::Args)]
pub struct LrFindArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// The first learning rate of the range.
    #[arg(long, default_value_t = 1e-7)]
    pub start: f64,
    /// The last learning rate of the range.
    #[arg(long, default_value_t = 10.0)]
    pub end: f64,
    /// Steps from --start to --end (the rate grows exponentially), 5 to 100,000.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Stop once the smoothed loss exceeds this multiple of its minimum.
    #[arg(long, default_value_t = 4.0)]
    pub diverge: f64,
    /// Write the suggested learning rate (steepest descent) as `lr` into this TOML config
    /// (created, or updated: only its lr line changes, comments and order stay).
    #[arg(long)]
    pub apply: Option<PathBuf>,
}

/// What Ctrl-C stops, once a trainer exists: its stop flag and what to say, first and on a
/// second press. Before that (loading the data, fitting a PCA) Ctrl-C exits at once: nothing
/// has been trained or written yet.
type Interrupt = (Arc<AtomicBool>, &'static str, &'static str);
static ON_CTRL_C: std::sync::Mutex<Option<Interrupt>> = std::sync::Mutex::new(None);

fn install_ctrl_c() {
    let pressed = AtomicBool::new(false);
    let _ = ctrlc::set_handler(move || {
        let target = ON_CTRL_C.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((flag, first, again)) = target else {
            tell!("\ninterrupt: stopped before the first step (nothing was trained; no checkpoint was written)");
            std::process::exit(130);
        };
        if pressed.swap(true, Ordering::SeqCst) {
            tell!("\n{again}");
            std::process::exit(130);
        }
        tell!("\n{first}");
        flag.store(true, Ordering::SeqCst);
    });
}

/// From now on, Ctrl-C sets `flag` (saying `first`); a second one exits (saying `again`).
fn on_ctrl_c(flag: Arc<AtomicBool>, first: &'static str, again: &'static str) {
    *ON_CTRL_C.lock().unwrap_or_else(|e| e.into_inner()) = Some((flag, first, again));
}

pub fn train(args: &TrainArgs) -> Result<()> {
    run(args, None)
}

pub fn lr_find(args: &LrFindArgs) -> Result<()> {
    check_range("--steps", args.steps, 5, 100_000)?;
    if !(args.start > 0.0 && args.end > args.start && (args.end as f32).is_finite()) {
        bail!(
            "invalid --start {} / --end {}: need 0 < start < end, a finite f32 (rates are f32)",
            args.start,
            args.end
        );
    }
    if !(args.diverge > 1.0 && args.diverge.is_finite()) {
        bail!("invalid --diverge {}: must be a number > 1", args.diverge);
    }
    if let Some(p) = &args.apply {
        check_writable(p)?;
    }
    run(&args.train, Some(args))
}

fn run(args: &TrainArgs, find: Option<&LrFindArgs>) -> Result<()> {
    install_ctrl_c();
    check_range("--batch-size", args.batch_size, 1, 65_536)?;
    check_range("--epochs", args.epochs, 1, 1_000_000)?;
    check_range("--workers", args.workers, 0, 64)?;
    if !(0.0..=0.9).contains(&args.validation) {
        bail!(
            "invalid --validation {}: the held-out fraction must be from 0 to 0.9",
            args.validation
        );
    }
    if !(args.min_delta >= 0.0 && args.min_delta.is_finite()) {
        bail!(
            "invalid --min-delta {}: must be a number >= 0",
            args.min_delta
        );
    }
    if args.log_every == 0 {
        bail!("invalid --log-every 0: must be at least 1");
    }
    if !(0.01..=1024.0).contains(&args.bucket_mb) {
        bail!(
            "invalid --bucket-mb {}: must be from 0.01 to 1024",
            args.bucket_mb
        );
    }
    let comm = regimen::dist::world();
    let (rank, ranks) = (comm.rank(), comm.size());
    if ranks > 1 {
        if find.is_some() {
            bail!("lr-find runs in one process: start it without mpirun or srun");
        }
        // Every rank must run the same command: compare the resolved configs.
        let resolved = toml::to_string(args).context("writing the resolved config")?;
        regimen::dist::check_same(&*comm, "resolved config", resolved.as_bytes())?;
    }
    // The linear scaling rule on the batch of one update over all ranks.
    let global_batch = args.batch_size * ranks * args.optim.accumulate.max(1);
    let scaled;
    let optim_args = match args.lr_batch {
        Some(base) => {
            check_range("--lr-batch", base, 1, 1 << 24)?;
            scaled = recipe::OptimArgs {
                lr: args.optim.lr * global_batch as f64 / base as f64,
                ..args.optim.clone()
            };
            &scaled
        }
        None => &args.optim,
    };
    // Every metric of a record except the learning rate, which the schedule sets.
    let monitored: Vec<&str> = Record::METRICS
        .iter()
        .copied()
        .filter(|m| *m != "lr")
        .collect();
    if !monitored.contains(&args.monitor.as_str()) {
        bail!(
            "invalid --monitor {:?}: expected one of {}",
            args.monitor,
            monitored.join(", ")
        );
    }
    let needs_val = args.monitor.starts_with("val") || args.monitor == "gap";
    if args.validation == 0.0 && (args.early_stopping.is_some() && needs_val) {
        bail!(
            "--early-stopping on {} needs a validation split: give --validation > 0",
            args.monitor
        );
    }
    if args.optim.schedule.starts_with("plateau") && args.validation == 0.0 {
        bail!("--schedule plateau decides on the validation loss: give --validation > 0");
    }
    if args.restore_best && args.early_stopping.is_none() {
        bail!("--restore-best restores the best epoch of early stopping: give --early-stopping N");
    }
    if let Some(path) = &args.save {
        check_writable(path)?;
    }
    // Every flag is checked before any data is read.
    let preprocess = PreprocessKind::parse(&args.preprocess)?;
    let augment = Pipeline::parse(&args.augment)?;
    let optim = recipe::optimizer(optim_args)?;
    let penalty = recipe::penalty(optim_args)?;
    let ls = CrossEntropy::with_label_smoothing(args.label_smoothing)?;
    let precision = bench::parse_precision(&args.precision)?;
    // With several ranks, a bare `cuda` is one GPU per rank (by local rank).
    let device = regimen::dist::rank_device(&args.device, comm.rank(), ranks)?;
    if args.graph && device == regimen::Device::Cpu {
        bail!("--graph records a CUDA graph: it needs --device cuda");
    }
    if args.graph && ranks > 1 {
        bail!(
            "--graph builds batches on the GPU, which is for one process: data-parallel ranks \
             build theirs on the host (leave out --graph)"
        );
    }
    if device == regimen::Device::Cpu && precision != regimen::Precision::F32 {
        say!(
            "note: --precision {} on the CPU computes through f32 copies: slower than f32 and no \
             smaller (16-bit precision is for GPUs)",
            args.precision
        );
    }
    // Data-parallel ranks take their slices of each global batch from the host loader.
    let device_data = device != regimen::Device::Cpu && ranks == 1 && !args.host_data;
    if args.graph && !device_data {
        bail!("--graph builds batches on the GPU: leave out --host-data");
    }
    let model_name = args.model.clone().unwrap_or_else(|| {
        if args.source.dataset == "digits" {
            "digits-cnn".into()
        } else {
            "cnn".into()
        }
    });
    let spec = models::ModelSpec::parse(&model_name).context("--model")?;
    recipe::schedule(optim_args, args.epochs.max(1), 1 << 20, false)?;
    if args.check_only {
        return Ok(());
    }
    // The run folder: checked (or created) before any training, by rank 0, which tells the
    // other ranks its name.
    let out_existed = args.out.as_ref().is_some_and(|d| d.exists());
    let out = if rank == 0 {
        prepare_run_folder(args, find.is_some(), &model_name)?
    } else {
        PathBuf::new()
    };
    // A folder this run created, removed again if the run is refused before it writes
    // anything into it (the checks after the data is read: memory, batch norm).
    let _unused_folder = UnusedRunFolder(
        (rank == 0 && args.resume.is_none() && !out_existed && !out.as_os_str().is_empty())
            .then(|| out.clone()),
    );
    let out = if ranks > 1 {
        let name = comm.broadcast_bytes(out.to_string_lossy().into_owned().into_bytes(), 0)?;
        PathBuf::from(String::from_utf8_lossy(&name).into_owned())
    } else {
        out
    };
    let ckpt_dir = out.join("checkpoints");
    let last = ckpt_dir.join("last.safetensors");
    if args.resume.is_some() && !last.is_file() {
        bail!(
            "--resume {}: no checkpoint {} (is this a run folder of regimen train, on a disk \
             every rank sees?)",
            out.display(),
            last.display()
        );
    }

    let splits = args.source.load()?;
    // What the run trains on, kept in its checkpoints: a resume on other files (another
    // subset, a changed folder) would draw another validation split and fit the
    // preprocessing again, so it is refused.
    let data_id = format!(
        "{} training and {} test images, fingerprint {:016x}-{:016x}",
        splits.train.len(),
        splits.test.len(),
        splits.train.fingerprint(),
        splits.test.fingerprint()
    );
    // The run state a resume continues, read once: its metadata is checked here, its
    // tensors go to the trainer below.
    let mut resumed = match args.resume {
        Some(_) => Some(
            regimen::RunState::load(&last)
                .with_context(|| format!("resuming from {}", last.display()))?,
        ),
        None => None,
    };
    if let Some(meta) = resumed.as_ref().map(|s| &s.meta) {
        if let Some(was) = meta.get("data").filter(|was| **was != data_id) {
            bail!(
                "--resume {}: the data in {} is not what the run was trained on (the run: {was}; \
                 now: {data_id}); give --data-dir the run's own files",
                out.display(),
                splits.source
            );
        }
        // The settings too: a config.toml edited after the checkpoint would change the
        // resumed run silently (only what --resume accepts may differ).
        if let Some(saved) = meta
            .get("config")
            .and_then(|c| c.parse::<toml::Table>().ok())
        {
            let now: toml::Table = toml::to_string(args)
                .context("writing the resolved config")?
                .parse()
                .context("reading the resolved config")?;
            let free = ["epochs", "workers", "device", "data_dir"];
            let shown =
                |v: Option<&toml::Value>| v.map_or("nothing".to_string(), |v| v.to_string());
            // Keys in both: a setting that a newer build added (or an older one had) is not
            // an edit.
            if let Some(key) = saved.keys().find(|k| {
                !free.contains(&k.as_str()) && now.get(*k).is_some_and(|v| Some(v) != saved.get(*k))
            }) {
                bail!(
                    "--resume {}: its config.toml sets {key} = {}, but the run was trained with {key} = {} \
                     (its checkpoint's settings); a resumed run keeps its settings: put the line back, \
                     or start a new run with --config",
                    out.display(),
                    shown(now.get(key)),
                    shown(saved.get(key))
                );
            }
        }
    }
    let prepared = Prepared::new(
        splits.train,
        splits.test,
        preprocess,
        args.validation,
        args.seed,
    )?;
    augment.check_image_shape(prepared.train.image_shape)?;
    if let Some(v) = prepared.validation.as_ref().filter(|v| v.len() < 100) {
        say!(
            "note: --validation {} holds out {} image{}: its accuracy moves in steps of {:.1} points, too coarse to choose the best epoch by",
            args.validation,
            v.len(),
            if v.len() == 1 { "" } else { "s" },
            100.0 / v.len().max(1) as f64
        );
    }
    let (input, classes) = (prepared.train.image_shape, prepared.train.num_classes());
    let plan = match spec.plan(input, classes) {
        Ok(p) => p,
        // PCA and whitening turn each image into K numbers ([K, 1, 1]): no room for a window.
        Err(e) if input[1] == 1 && input[2] == 1 && args.preprocess.contains(':') => bail!(
            "--model {model_name}: {e}: --preprocess {} turns each image into {} features, \
             which a convolutional model cannot take; train an MLP on them (such as \
             digits-mlp, or a spec starting with flatten)",
            args.preprocess,
            input[0]
        ),
        Err(e) => return Err(anyhow::Error::from(e).context("--model")),
    };
    // Batch norm over features cannot normalize one sample in training (one value per
    // channel), which an epoch's short last batch, or a rank's share of it, may be.
    let global = args.batch_size * ranks;
    let rest = prepared.train.len() % global;
    let synced = args.sync_bn && ranks > 1;
    if rest >= ranks
        && (if synced { rest < 2 } else { rest < 2 * ranks })
        && spec.has_feature_batch_norm(input, classes)?
    {
        bail!(
            "--batch-size {}: the last batch of each epoch holds {rest} of the {} training images, so {} one sample, which the model's batch norm over features (bn after flatten or linear) cannot normalize in training: choose another --batch-size{}",
            args.batch_size,
            prepared.train.len(),
            if ranks > 1 && !synced { "a rank gets" } else { "it is" },
            if ranks > 1 && !synced { " (or --sync-bn)" } else { "" }
        );
    }
    if device == regimen::Device::Cpu {
        check_training_memory(
            &format!("--model {model_name} at --batch-size {}", args.batch_size),
            &plan,
            input,
            args.batch_size,
            "--batch-size",
        )?;
    }
    // Steps per epoch of the global batch (the per-rank batch times the ranks).
    let per_epoch =
        regimen::data::batches_per_epoch(prepared.train.len(), args.batch_size * ranks, ranks);
    let (schedule, unit) = recipe::schedule(optim_args, args.epochs, per_epoch, true)?;
    if args.snapshots {
        if let Some(step) =
            regimen::trainer::cycle_end_inside_an_epoch(&*schedule, unit, per_epoch, args.epochs)
        {
            say!(
                "note: --snapshots: a learning-rate cycle of --schedule {} ends at step {} (batch {} of epoch {}), inside an epoch; snapshots are taken at the ends of epochs, so such cycles get none: make each cycle a whole number of epochs ({per_epoch} steps each) or use --schedule-unit epoch",
                args.optim.schedule,
                step + 1,
                step % per_epoch + 1,
                step / per_epoch + 1
            );
        }
    }
    if args.optim.accumulate > args.epochs * per_epoch {
        bail!(
            "invalid --accumulate {}: the run has only {} batches ({} epochs of {per_epoch}), so no update would ever be applied",
            args.optim.accumulate,
            args.epochs * per_epoch,
            args.epochs
        );
    }
    let mut rng = Rng::new(args.seed);
    let mut model = spec.build(input, classes, &mut rng)?;
    regimen::layer::to_device(&mut model, device);
    if args.sync_bn && ranks > 1 {
        regimen::layer::Layer::sync_batch_norm(&mut model, true);
    }
    say!("{}", model.summary(&input)?);
    if ranks > 1 {
        say!(
            "data-parallel over {ranks} ranks ({}{}): global batch {} ({} per rank){}",
            comm.describe(),
            if device != regimen::Device::Cpu && regimen::dist::nccl_requested() {
                ", gradients summed GPU to GPU by NCCL"
            } else {
                ""
            },
            args.batch_size * ranks,
            args.batch_size,
            if args.sync_bn {
                ", batch norm synchronized"
            } else {
                ""
            }
        );
    } else if args.sync_bn {
        say!("--sync-bn: one process, nothing to synchronize");
    }
    if args.host_data && device == regimen::Device::Cpu {
        say!("--host-data: on the CPU the data is on the host already");
    }
    let o = optim_args;
    say!(
        "training {model_name} ({} parameters) on {} ({}): {} train / {} validation / {} test images, preprocess {}, augment {}, {} epochs, batch {}, {} lr {} schedule {}{}",
        plan.params,
        splits.name,
        splits.source,
        prepared.train.len(),
        prepared.validation.as_ref().map_or(0, |v| v.len()),
        prepared.test.len(),
        args.preprocess,
        args.augment,
        args.epochs,
        args.batch_size,
        optim.name(),
        match args.lr_batch {
            Some(base) => format!(
                "{} (the linear scaling rule: {} for batch {base}, {global_batch} here)",
                o.lr, args.optim.lr
            ),
            None => o.lr.to_string(),
        },
        o.schedule,
        if o.warmup > 0 { format!(" after {} warmup steps", o.warmup) } else { String::new() }
    );
    let fit = FitConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        seed: args.seed,
        unit,
        penalty,
        label_smoothing: ls.label_smoothing,
        augment,
        workers: args.workers,
        progress: false,
        device,
        precision,
        device_data,
        graph: args.graph,
        bucket_bytes: (args.bucket_mb * (1 << 20) as f64) as usize,
        ..Default::default()
    };
    // The resolved config: every flag's value, so that `--config DIR/config.toml` (and
    // `--resume DIR`) rebuild this run.
    let config_toml = toml::to_string(args).context("writing the resolved config")?;
    let [c, h, w] = input;
    let meta = std::collections::BTreeMap::from([
        ("model".to_string(), model_name.clone()),
        ("dataset".to_string(), splits.name.clone()),
        ("data".to_string(), data_id),
        ("input_shape".to_string(), format!("{c},{h},{w}")),
        ("classes".to_string(), classes.to_string()),
        ("config".to_string(), config_toml.clone()),
    ]);
    let Prepared {
        train,
        validation,
        test,
        preprocess: pre,
    } = prepared;
    let has_val = validation.is_some();
    let mut trainer = Trainer::new(model, optim, schedule, fit, train)
        .with_validation(validation)
        .with_test(Some(test))
        .with_preprocess(Some(pre))
        .with_meta(meta);
    if let Some(f) = find {
        return range_test(&mut trainer, f, &out);
    }
    // Rank 0 alone writes the run folder.
    let mut trainer = if rank == 0 {
        trainer.checkpoint_every_epoch(last.clone())
    } else {
        trainer
    };
    // The epochs the run is planned for (a resume with fewer only evaluates it).
    let mut planned_epochs = args.epochs;
    if let Some(dir) = &args.resume {
        let config_path = dir.join("config.toml");
        let state = resumed.take().expect("read above for --resume");
        trainer
            .resume_state(state, &last.display().to_string())
            .with_context(|| format!("resuming from {}", last.display()))?;
        let (done, batch) = trainer.position();
        say!(
            "resuming {} (config {}) after epoch {done}{}",
            dir.display(),
            config_path.display(),
            if batch > 0 {
                format!(", at batch {batch} of epoch {}", done + 1)
            } else {
                String::new()
            }
        );
        // A lengthened run (or data that moved): config.toml keeps saying what the run is.
        let before = std::fs::read_to_string(&config_path).unwrap_or_default();
        let old_epochs = before
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("epochs").and_then(toml::Value::as_integer))
            .unwrap_or(args.epochs as i64) as usize;
        planned_epochs = old_epochs.max(args.epochs);
        // A run that early stopping ended stays ended (its patience ran out): lengthening it
        // would stop again before its next epoch.
        if let (Some(patience), true) = (args.early_stopping, args.epochs > old_epochs) {
            let mode = Mode::for_metric(&args.monitor);
            let mut es = EarlyStopping::new(&args.monitor, mode, patience, args.min_delta)?;
            let mut control = regimen::trainer::Control::default();
            es.on_train_begin(trainer.history(), &mut control)?;
            if let Some(reason) = control.stopping() {
                bail!(
                    "--epochs {}: the run in {} ended by early stopping ({reason}); lengthened, it would stop again before its next epoch: start a new run instead (--config {}/config.toml, with more --early-stopping patience)",
                    args.epochs,
                    dir.display(),
                    dir.display()
                );
            }
        }
        if args.epochs <= done && args.epochs < old_epochs {
            say!(
                "note: --epochs {} is not above the {done} epochs the run in {} has trained: nothing is trained, the run is evaluated as it stands (--epochs with --resume lengthens a run)",
                args.epochs,
                dir.display()
            );
        } else if args.epochs < old_epochs {
            bail!(
                "--epochs {}: the run in {} is planned for {old_epochs} epochs (its schedule too) and has trained {done}; it can be lengthened, not shortened{}",
                args.epochs,
                dir.display(),
                match done {
                    0 => String::new(),
                    _ => format!(" (or give --epochs {done} to evaluate it as it stands)"),
                }
            );
        }
        if old_epochs < args.epochs {
            let name = args.optim.schedule.split(':').next().unwrap_or("");
            let fixed = ["constant", "step", "multistep", "exp", "plateau"].contains(&name);
            say!(
                "lengthening the run from {old_epochs} to {} epochs{}",
                args.epochs,
                if fixed {
                    String::new()
                } else {
                    format!(
                        "; --schedule {} is planned over the whole run, so from here on it follows the plan for {} epochs (its rate may change at once)",
                        args.optim.schedule, args.epochs
                    )
                }
            );
        }
        if rank == 0 && args.epochs >= old_epochs && before != config_toml {
            regimen::io::write_atomic(&config_path, config_toml.as_bytes())?;
        }
    } else if rank == 0 {
        regimen::io::write_atomic(&out.join("config.toml"), config_toml.as_bytes())?;
    }
    let mode = Mode::for_metric(&args.monitor);
    // One metric decides the best epoch: the best checkpoint, the summary and --restore-best.
    let (best_metric, best_mode, best_delta) = match (args.early_stopping, has_val) {
        (Some(_), _) => (args.monitor.as_str(), mode, args.min_delta),
        (None, true) => ("val_acc", Mode::Max, 0.0),
        (None, false) => ("train_acc", Mode::Max, 0.0),
    };
    if rank > 0 {
        // The other ranks make the same decisions (the figures are the world's) and write
        // nothing; rank 0's weights reach them before the final test.
        if let Some(patience) = args.early_stopping {
            trainer.add_callback(Box::new(EarlyStopping::new(
                &args.monitor,
                mode,
                patience,
                args.min_delta,
            )?));
        }
    } else {
        trainer.add_callback(Box::new(MetricsCsv::new(out.join("metrics.csv"))));
        trainer.add_callback(Box::new(TensorBoard::new(out.clone(), args.log_every)));
        trainer.add_callback(Box::new(
            BestCheckpoint::new(ckpt_dir.join("best.safetensors"), best_metric, best_mode)?
                .with_min_delta(best_delta)?,
        ));
        if let Some(patience) = args.early_stopping {
            let mut es = EarlyStopping::new(&args.monitor, mode, patience, args.min_delta)?;
            if args.restore_best {
                es = es
                    .restore_best_weights()
                    .best_file(ckpt_dir.join("early-stopping-best.safetensors"));
            }
            trainer.add_callback(Box::new(es));
        }
        if args.snapshots {
            trainer.add_callback(Box::new(SnapshotEnsemble::new(ckpt_dir.clone())));
        }
        trainer.add_callback(Box::new(Console::new(
            args.epochs,
            per_epoch,
            has_val,
            out.clone(),
        )));
    }

    // Ctrl-C: the first stops after the current step and writes a resumable checkpoint; a
    // second one exits at once.
    let stop = trainer.stop_flag();
    on_ctrl_c(
        stop.clone(),
        "interrupt: stopping after this step (press Ctrl-C again to quit at once)",
        "interrupted again: exiting without a checkpoint",
    );

    // A deterministic interrupt for tests: as if Ctrl-C were pressed during update N (on
    // every rank, or on rank REGIMEN_INTERRUPT_RANK alone).
    let interrupt_rank = std::env::var("REGIMEN_INTERRUPT_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if let (Some(n), true) = (
        std::env::var("REGIMEN_INTERRUPT_AT_STEP")
            .ok()
            .and_then(|v| v.parse::<u64>().ok()),
        interrupt_rank.is_none_or(|r| r == rank),
    ) {
        trainer.add_callback(Box::new(InterruptAt {
            step: n,
            flag: stop.clone(),
        }));
    }
    let outcome = match trainer.run() {
        Ok(o) => o,
        Err(e @ regimen::Error::Diverged { .. }) if rank > 0 => {
            // Wait for rank 0 to save what it saves: an error exit here would have the
            // launcher end rank 0 in the middle of it.
            comm.broadcast_bytes(Vec::new(), 0)?;
            return Err(e.into());
        }
        Err(e @ regimen::Error::Diverged { .. }) => {
            plots(&out, trainer.history())?;
            if let Some(path) = &args.save {
                // The model is back at its last finite state.
                save_model(&mut trainer, path)?;
                say!(
                    "saved the model (its last finite state) to {}",
                    path.display()
                );
            }
            // The error first, then where the run stands (anyhow prints the context first).
            let after = if last.is_file() {
                format!("the last good checkpoint is {}", last.display())
            } else {
                "no epoch finished, so there is no checkpoint to resume from".to_string()
            };
            if ranks > 1 {
                // Everything is written: the other ranks may end.
                comm.broadcast_bytes(Vec::new(), 0)?;
            }
            return Err(anyhow::anyhow!("{e}; {after}"));
        }
        Err(e) => return Err(e.into()),
    };
    if rank > 0 {
        if let Ending::Interrupted { .. } = outcome.ending {
            regimen::dist::finish();
            std::process::exit(130);
        }
        return Ok(());
    }
    plots(&out, trainer.history())?;
    if let Ending::Interrupted { epoch, batch } = outcome.ending {
        say!(
            "interrupted in epoch {epoch} before batch {batch}: the run is saved in {}; continue it with\n  regimen train --resume {}",
            last.display(),
            out.display()
        );
        regimen::dist::finish();
        std::process::exit(130);
    }
    if let Some(path) = &args.save {
        save_model(&mut trainer, path)?;
        say!(
            "saved the model and its preprocessing to {}",
            path.display()
        );
    }
    let history = trainer.history();
    let secs: f64 = history.iter().map(|r| r.seconds).sum();
    let samples: f64 = history.iter().map(|r| r.samples_per_sec * r.seconds).sum();
    let (test_loss, test_acc) = outcome.test.unwrap_or((f32::NAN, f32::NAN));
    if let Ending::Stopped(reason) = &outcome.ending {
        say!("{reason}");
    }
    let best = regimen::trainer::best_record_by(history, best_metric, best_mode, best_delta)?;
    let best_file = ckpt_dir.join("best.safetensors");
    if let Some(b) = best {
        let value = b.metric(best_metric).unwrap_or(f64::NAN);
        // A run folder copied without it, or the file removed before a resume: say so rather
        // than point at nothing.
        let at = if best_file.is_file() {
            format!("in {}", best_file.display())
        } else {
            format!(
                "but its checkpoint {} is missing (removed after it was written)",
                best_file.display()
            )
        };
        match b.val_acc {
            Some(v) => say!(
                "best epoch {} by {best_metric} ({value:.4}): validation accuracy {:.2}% (loss {:.4}), {at}",
                b.epoch,
                100.0 * v,
                b.val_loss.unwrap_or(f32::NAN),
            ),
            None => say!("best epoch {} by {best_metric} ({value:.4}), {at}", b.epoch),
        }
        if args.restore_best {
            say!(
                "--restore-best: the model is back at epoch {}; the test accuracy below is its",
                b.epoch
            );
        }
    }
    let last_rec = history.last();
    // The epoch whose weights the test measured: the last, or the best one --restore-best
    // put back.
    let tested = if args.restore_best {
        best.or(last_rec)
    } else {
        last_rec
    };
    say!(
        "final test accuracy {:.2}% (loss {:.4}; generalization gap {:.2} points); {:.1} s of training, {:.0} samples/s",
        100.0 * test_acc,
        test_loss,
        100.0 * (tested.map_or(f32::NAN, |r| r.train_acc) - test_acc),
        secs,
        samples / secs.max(1e-9)
    );
    let summary = serde_json::json!({
        "model": model_name,
        "dataset": splits.name,
        "parameters": plan.params,
        "epochs": history.len(),
        "ending": match &outcome.ending {
            Ending::Completed if history.len() < planned_epochs => format!(
                "evaluated after {} of its {planned_epochs} epochs (not completed)",
                history.len()
            ),
            Ending::Completed => "completed".to_string(),
            Ending::Stopped(r) => r.clone(),
            Ending::Interrupted { .. } => "interrupted".to_string(),
        },
        "best_epoch": best.map(|b| b.epoch),
        "best_metric": best_metric,
        "best_epoch_val_accuracy": best.and_then(|b| b.val_acc),
        // The highest validation accuracy of any epoch (what `regimen sweep` ranks by).
        "best_val_accuracy": history.iter().filter_map(|r| r.val_acc).reduce(f32::max),
        "final_val_accuracy": last_rec.and_then(|r| r.val_acc),
        "final_train_accuracy": last_rec.map(|r| r.train_acc),
        "test_accuracy": outcome.test.map(|t| t.1),
        "test_loss": outcome.test.map(|t| t.0),
        // Whose weights the test measured: the final model's (the last epoch's, or the best
        // epoch's with --restore-best), not best.safetensors' (what `regimen eval RUN` reads).
        "test_epoch": tested.map(|r| r.epoch),
        "wall_seconds": secs,
        "samples_per_sec": samples / secs.max(1e-9),
        "checkpoints": {
            "last": last,
            // null when the file is not there (a best epoch whose file was removed).
            "best": best_file.is_file().then_some(&best_file),
        },
    });
    regimen::io::write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    say!("run folder: {}", out.display());
    Ok(())
}

/// `loss.png`, `accuracy.png` and `lr.png` of a history.
/// `text` (a TOML config) with its top-level `lr` line set to `lr`, or `lr = ...` added before
/// the first table: every other line, comments (an inline one on the `lr` line too), order and
/// line endings included, stays as it was.
fn set_lr_line(text: &str, lr: f64) -> String {
    let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let value = format!("lr = {lr:?}");
    let mut out = Vec::new();
    let (mut done, mut in_table) = (false, false);
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with('[') && !done {
            out.push(value.clone());
            done = true;
        }
        in_table |= t.starts_with('[');
        let key = t.split('=').next().unwrap_or("").trim();
        if !in_table && t.contains('=') && matches!(key, "lr" | "\"lr\"" | "'lr'") {
            if !done {
                // Keep a comment after the value (`lr = 0.1 # from lr-find`).
                let comment = l
                    .split_once('#')
                    .filter(|(before, _)| !before.contains('"') && !before.contains('\''))
                    .map(|(_, c)| format!(" #{c}"))
                    .unwrap_or_default();
                out.push(format!("{value}{comment}"));
                done = true;
            }
            continue;
        }
        out.push(l.to_string());
    }
    if !done {
        out.push(value);
    }
    out.join(eol) + eol
}

/// `--save`: the trainer's model, its preprocessing and metadata, as a checkpoint at `path`.
fn save_model(trainer: &mut Trainer, path: &Path) -> Result<()> {
    regimen::checkpoint::save(
        path,
        &mut trainer.model,
        trainer.preprocess.as_ref(),
        trainer.meta.clone(),
    )?;
    Ok(())
}

pub fn plots(dir: &Path, history: &[Record]) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let pts = |f: &dyn Fn(&Record) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    let mut loss = vec![Series::new("train", pts(&|r| Some(r.train_loss as f64)))];
    let mut acc = vec![Series::new(
        "train",
        pts(&|r| Some(100.0 * r.train_acc as f64)),
    )];
    if history.iter().any(|r| r.val_loss.is_some()) {
        loss.push(Series::new(
            "validation",
            pts(&|r| r.val_loss.map(f64::from)),
        ));
        acc.push(Series::new(
            "validation",
            pts(&|r| r.val_acc.map(|v| 100.0 * v as f64)),
        ));
    }
    plot::lines(
        &dir.join("loss.png"),
        &Plot {
            title: "Loss per epoch",
            x_label: "epoch",
            y_label: "cross-entropy",
            log_y: false,
        },
        &loss,
    )?;
    plot::lines(
        &dir.join("accuracy.png"),
        &Plot {
            title: "Accuracy per epoch",
            x_label: "epoch",
            y_label: "accuracy (%)",
            log_y: false,
        },
        &acc,
    )?;
    plot::lines(
        &dir.join("lr.png"),
        &Plot {
            title: "Learning rate (last step of each epoch)",
            x_label: "epoch",
            y_label: "learning rate",
            log_y: false,
        },
        &[Series::new("", pts(&|r| Some(r.lr)))],
    )?;
    Ok(())
}

/// The terminal side of a run: a progress bar with rate and ETA during each epoch (plain
/// lines every few seconds when stderr is not a terminal), a table row per epoch, and the
/// plots redrawn after each epoch.
struct Console {
    epochs: usize,
    per_epoch: usize,
    has_val: bool,
    dir: PathBuf,
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
    epoch_start: std::time::Instant,
    last_line: std::time::Instant,
    header: bool,
}

impl Console {
    fn new(epochs: usize, per_epoch: usize, has_val: bool, dir: PathBuf) -> Console {
        Console {
            epochs,
            per_epoch,
            has_val,
            dir,
            bar: None,
            tty: std::io::stderr().is_terminal(),
            epoch_start: std::time::Instant::now(),
            last_line: std::time::Instant::now(),
            header: false,
        }
    }
}

impl Callback for Console {
    fn on_epoch_begin(
        &mut self,
        epoch: usize,
        _control: &mut Control,
    ) -> Result<(), regimen::Error> {
        if !self.header {
            self.header = true;
            say!(
                "{:>5} {:>10} {:>9} {:>10} {:>9} {:>7} {:>10} {:>9} {:>7}",
                "epoch",
                "train loss",
                "train acc",
                if self.has_val { "val loss" } else { "" },
                if self.has_val { "val acc" } else { "" },
                if self.has_val { "gap" } else { "" },
                "lr",
                "samples/s",
                "time"
            );
        }
        self.epoch_start = std::time::Instant::now();
        self.last_line = std::time::Instant::now();
        if self.tty {
            let bar = indicatif::ProgressBar::new(self.per_epoch as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {msg} [{bar:30}] {pos}/{len} batches, {per_sec}, ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("{epoch}/{}", self.epochs));
            self.bar = Some(bar);
        }
        Ok(())
    }

    fn on_step_end(
        &mut self,
        step: &StepEnd,
        _control: &mut Control,
    ) -> Result<(), regimen::Error> {
        match &self.bar {
            Some(bar) => bar.set_position(step.batch as u64 + 1),
            None if self.last_line.elapsed().as_secs_f32() > 10.0 => {
                let done = step.batch + 1;
                let el = self.epoch_start.elapsed().as_secs_f32();
                tell!(
                    "epoch {}/{}: batch {done}/{}, {el:.0}s elapsed, about {:.0}s left",
                    step.epoch,
                    self.epochs,
                    self.per_epoch,
                    el / done as f32 * (self.per_epoch - done) as f32
                );
                self.last_line = std::time::Instant::now();
            }
            None => {}
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<(), regimen::Error> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let r = end.record;
        let opt = |v: Option<f32>, pct: bool| match v {
            Some(v) if pct => format!("{:.2}%", 100.0 * v),
            Some(v) => format!("{v:.4}"),
            None => String::new(),
        };
        say!(
            "{:>5} {:>10.4} {:>8.2}% {:>10} {:>9} {:>7} {:>10.3e} {:>9.0} {:>6.1}s",
            r.epoch,
            r.train_loss,
            100.0 * r.train_acc,
            opt(r.val_loss, false),
            opt(r.val_acc, true),
            r.gap.map_or(String::new(), |g| format!("{:.2}", 100.0 * g)),
            r.lr,
            r.samples_per_sec,
            r.seconds
        );
        plots(&self.dir, end.history).map_err(|e| regimen::Error::Data {
            file: self.dir.display().to_string(),
            reason: format!("{e:#}"),
        })?;
        Ok(())
    }

    fn on_train_end(
        &mut self,
        _h: &[Record],
        _m: &mut dyn regimen::Layer,
    ) -> Result<(), regimen::Error> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        Ok(())
    }
}

/// Raises the stop flag during update `step` (`REGIMEN_INTERRUPT_AT_STEP`, for tests).
struct InterruptAt {
    step: u64,
    flag: Arc<AtomicBool>,
}

impl Callback for InterruptAt {
    fn on_step_end(
        &mut self,
        step: &StepEnd,
        _control: &mut Control,
    ) -> Result<(), regimen::Error> {
        if step.step == self.step {
            self.flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Run the range test and write `lr-find.csv` and `lr-find.png` into `out`.
fn range_test(trainer: &mut Trainer, f: &LrFindArgs, out: &Path) -> Result<()> {
    say!(
        "range test: learning rate from {:e} to {:e} over {} steps (stops when the smoothed loss exceeds {} times its minimum)",
        f.start, f.end, f.steps, f.diverge
    );
    // Ctrl-C: the first ends the test after the current step and keeps the steps run so far
    // (CSV and plot, no --apply); a second one exits at once.
    on_ctrl_c(
        trainer.stop_flag(),
        "interrupt: ending the range test after this step (press Ctrl-C again to quit at once)",
        "interrupted again: exiting",
    );
    let t = trainer.lr_find(f.start, f.end, f.steps, f.diverge)?;
    if t.interrupted && t.points.is_empty() {
        tell!("interrupted before the first step: nothing to show");
        std::process::exit(130);
    }
    let mut csv = String::from("step,lr,loss,smoothed_loss\n");
    for (i, (lr, l, s)) in t.points.iter().enumerate() {
        csv += &format!("{},{lr},{l},{s}\n", i + 1);
    }
    regimen::io::write_atomic(&out.join("lr-find.csv"), csv.as_bytes())?;
    let mut series = vec![
        Series::new(
            "loss",
            t.points.iter().map(|p| (p.0.log10(), p.1 as f64)).collect(),
        ),
        Series::new(
            "smoothed (EMA 0.98, bias-corrected)",
            t.points.iter().map(|p| (p.0.log10(), p.2)).collect(),
        ),
    ];
    let at = |lr: f64| {
        t.points
            .iter()
            .min_by(|a, b| {
                (a.0.ln() - lr.ln())
                    .abs()
                    .partial_cmp(&(b.0.ln() - lr.ln()).abs())
                    .expect("finite")
            })
            .map(|p| (lr.log10(), p.2))
    };
    if let Some(s) = t.steepest {
        series.push(Series::new(
            &format!("steepest descent: {s:.2e}"),
            at(s).into_iter().collect(),
        ));
    }
    if let Some(m) = t.min_over_10 {
        series.push(Series::new(
            &format!("minimum / 10: {m:.2e}"),
            at(m).into_iter().collect(),
        ));
    }
    // Clip the exploded tail so the interesting part stays visible.
    let min = t.points.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
    let cap = if min.is_finite() {
        4.0 * min.max(1e-3)
    } else {
        f64::INFINITY
    };
    for s in series.iter_mut() {
        s.points.retain(|p| p.1 <= cap);
    }
    plot::lines(
        &out.join("lr-find.png"),
        &Plot {
            title: "Learning-rate range test",
            x_label: "log10 learning rate",
            y_label: "training loss",
            log_y: false,
        },
        &series,
    )?;
    say!(
        "{} steps{}; the loss and its smoothing are in {}, the plot in {}",
        t.points.len(),
        if t.diverged {
            " (stopped: the loss diverged)"
        } else if t.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        out.join("lr-find.csv").display(),
        out.join("lr-find.png").display()
    );
    match t.steepest {
        Some(s) => {
            say!("suggestion (steepest descent of the smoothed loss against log lr): {s:.3e}")
        }
        None => say!("no steepest-descent suggestion: the loss never fell"),
    }
    if let Some(m) = t.min_over_10 {
        say!("suggestion (the minimum of the smoothed loss, divided by 10): {m:.3e}");
    }
    if t.interrupted {
        if let Some(path) = &f.apply {
            say!(
                "--apply {}: not applied, the range test was interrupted before its end",
                path.display()
            );
        }
        std::process::exit(130);
    }
    if let Some(path) = &f.apply {
        let lr = t
            .steepest
            .or(t.min_over_10)
            .ok_or_else(|| anyhow::anyhow!("no suggestion to apply"))?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => anyhow::bail!("--apply {}: cannot read it: {e}", path.display()),
        };
        // Three significant digits.
        let lr: f64 = format!("{lr:.2e}").parse().expect("a number");
        let updated = set_lr_line(&text, lr);
        // What is written must still be a config (and say the new rate).
        let table: toml::Table = updated
            .parse()
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        if table.get("lr").and_then(toml::Value::as_float) != Some(lr) {
            anyhow::bail!(
                "config {}: could not set lr (is it inside a table?)",
                path.display()
            );
        }
        regimen::io::write_atomic(path, updated.as_bytes())?;
        say!("wrote lr = {lr} into {}", path.display());
    }
    Ok(())
}

/// Refuses a run whose least memory would not fit in what this machine has available: the
/// parameters four times (weights, gradients, two optimizer states at most) and each layer's
/// output for a batch twice (kept for backward, and its gradient). An allocation that fails
/// would abort the process mid-run instead.
pub fn check_training_memory(
    what: &str,
    plan: &regimen::models::Plan,
    input: [usize; 3],
    batch: usize,
    batch_flag: &str,
) -> Result<()> {
    let Some(avail) = regimen::io::available_memory() else {
        return Ok(());
    };
    let params = (plan.params as u64).saturating_mul(16);
    let per_sample: u64 = std::iter::once(input.iter().product::<usize>())
        .chain(plan.shapes.iter().map(|s| s.iter().product::<usize>()))
        .map(|n| n as u64)
        .sum();
    let activations = per_sample.saturating_mul(batch as u64).saturating_mul(8);
    let need = params.saturating_add(activations);
    if need > avail {
        bail!(
            "{what}: training needs at least {} ({} for {} parameters' weights, gradients and optimizer state, {} for the activations of a batch), and this machine has {} available: lower {batch_flag} or the model's size",
            regimen::io::human_bytes(need),
            regimen::io::human_bytes(params),
            plan.params,
            regimen::io::human_bytes(activations),
            regimen::io::human_bytes(avail)
        );
    }
    Ok(())
}

/// Removes, when dropped, a run folder that holds nothing but an empty `checkpoints/`.
struct UnusedRunFolder(Option<PathBuf>);

impl Drop for UnusedRunFolder {
    fn drop(&mut self) {
        let Some(dir) = &self.0 else { return };
        let only_empty_checkpoints = std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().all(|e| {
                e.file_name() == "checkpoints"
                    && std::fs::read_dir(e.path()).is_ok_and(|mut c| c.next().is_none())
            })
        });
        if only_empty_checkpoints {
            let _ = std::fs::remove_dir(dir.join("checkpoints"));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::set_lr_line;

    #[test]
    fn set_lr_line_changes_only_the_rate() {
        // Replaced in place, its inline comment kept; other lines as they were.
        assert_eq!(
            set_lr_line("# mine\nlr = 0.5 # guess\nepochs = 3\n", 0.01),
            "# mine\nlr = 0.01 # guess\nepochs = 3\n"
        );
        // Quoted keys; CRLF kept; no trailing newline.
        assert_eq!(
            set_lr_line("'lr' = 1\r\nx = 2", 0.2),
            "lr = 0.2\r\nx = 2\r\n"
        );
        assert_eq!(set_lr_line("\"lr\" = 1\n", 0.2), "lr = 0.2\n");
        // An lr inside a table is not the run's: a top-level one goes before the first table.
        assert_eq!(
            set_lr_line("epochs = 1\n[extra]\nlr = 5\n", 0.3),
            "epochs = 1\nlr = 0.3\n[extra]\nlr = 5\n"
        );
        assert_eq!(set_lr_line("", 0.001), "lr = 0.001\n");
        // lr_batch is another key.
        assert_eq!(
            set_lr_line("lr_batch = 256\n", 0.1),
            "lr_batch = 256\nlr = 0.1\n"
        );
    }
}
