//! `regimen sweep`: random search over a space of `train` settings with successive halving.
//!
//! The space is a TOML file whose keys are `train`'s flags and whose values are
//! `log_uniform(A, B)`, `uniform(A, B)`, `int(A, B)` or `choice(X, Y, ...)`. Trials are drawn
//! with a seed. Successive halving (Jamieson and Talwalkar 2016; the synchronous form of ASHA,
//! Li et al. 2018): every trial runs at the smallest budget of epochs, the best `1/eta` by
//! validation accuracy are promoted to `eta` times the budget, up to the base config's epochs.
//! Each trial is a `regimen train` process with its own run folder, `--jobs` at once, the CPU
//! threads split among them. The sweep's state is `sweep.json`, rewritten after every trial: a
//! killed sweep started again skips the finished trials and resumes an interrupted one from
//! its checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use regimen::Rng;

use crate::plot::{self, Plot, Series};

#[derive(clap::Args)]
pub struct SweepArgs {
    /// The search space: a TOML file of `key = "log_uniform(1e-4, 1)"`, `"uniform(0, 0.5)"`,
    /// `"int(1, 4)"` or `"choice(64, 128, 256)"`, keys named like train's flags.
    #[arg(long)]
    pub space: PathBuf,
    /// The base config (a train TOML); its `epochs` is the largest budget.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trials to draw, 1 to 10,000.
    #[arg(long, default_value_t = 16)]
    pub trials: usize,
    /// Trials running at once, 1 to 64 (the CPU threads are split among them).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// The sweep folder (default: a new folder under runs/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the draws (each trial also trains with the base config's seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Successive halving's factor: 1/eta of the trials are promoted to eta times the budget
    /// (1: every trial runs the full budget, plain random search).
    #[arg(long, default_value_t = 4)]
    pub eta: usize,
    /// The smallest budget in epochs (default: the full budget divided by eta until the
    /// trials are used up, at least 1).
    #[arg(long)]
    pub min_epochs: Option<usize>,
}

/// One dimension of the space.
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    LogUniform(f64, f64),
    Uniform(f64, f64),
    Int(i64, i64),
    Choice(Vec<toml::Value>),
}

impl Dim {
    /// Parse `log_uniform(A, B)` and friends; `what` names the file and key in errors.
    pub fn parse(text: &str, what: &str) -> Result<Dim> {
        let bad = |why: &str| anyhow!("{what}: {why}");
        let text = text.trim();
        let (name, rest) = text.split_once('(').ok_or_else(|| {
            bad("expected log_uniform(A, B), uniform(A, B), int(A, B) or choice(X, ...)")
        })?;
        let inner = rest.strip_suffix(')').ok_or_else(|| bad("missing ')'"))?;
        let parts: Vec<&str> = if inner.trim().is_empty() {
            Vec::new()
        } else {
            split_args(inner)
        };
        let num = |s: &str| -> Result<f64> {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(&format!("{:?} is not a finite number", s.trim())))
        };
        let two = || -> Result<(f64, f64)> {
            if parts.len() != 2 {
                return Err(bad("takes two bounds"));
            }
            let (a, b) = (num(parts[0])?, num(parts[1])?);
            if a >= b {
                return Err(bad("the lower bound must be below the upper one"));
            }
            Ok((a, b))
        };
        Ok(match name.trim() {
            "log_uniform" | "loguniform" => {
                let (a, b) = two()?;
                if a <= 0.0 {
                    return Err(bad("log_uniform needs bounds > 0"));
                }
                Dim::LogUniform(a, b)
            }
            "uniform" => {
                let (a, b) = two()?;
                Dim::Uniform(a, b)
            }
            "int" => {
                let (a, b) = two()?;
                if a.fract() != 0.0 || b.fract() != 0.0 {
                    return Err(bad("int takes whole bounds"));
                }
                Dim::Int(a as i64, b as i64)
            }
            "choice" => {
                if parts.is_empty() {
                    return Err(bad("choice needs at least one value"));
                }
                let mut vals = Vec::new();
                for p in parts {
                    let v: toml::Value = format!("v = {}", p.trim())
                        .parse::<toml::Table>()
                        .map_err(|_| {
                            bad(&format!(
                                "{:?} is not a TOML value (quote strings)",
                                p.trim()
                            ))
                        })?
                        .remove("v")
                        .expect("parsed");
                    vals.push(v);
                }
                Dim::Choice(vals)
            }
            other => {
                return Err(bad(&format!(
                    "unknown distribution {other:?}: expected log_uniform, uniform, int or choice"
                )))
            }
        })
    }

    fn sample(&self, rng: &mut Rng) -> toml::Value {
        match self {
            Dim::LogUniform(a, b) => {
                toml::Value::Float(sig((a.ln() + rng.next_f64() * (b.ln() - a.ln())).exp()))
            }
            Dim::Uniform(a, b) => toml::Value::Float(sig(a + rng.next_f64() * (b - a))),
            Dim::Int(a, b) => toml::Value::Integer(a + rng.below((b - a + 1) as usize) as i64),
            Dim::Choice(v) => v[rng.below(v.len())].clone(),
        }
    }

    fn is_log(&self) -> bool {
        matches!(self, Dim::LogUniform(..))
    }
}

/// Four significant digits (readable configs).
fn sig(v: f64) -> f64 {
    format!("{v:.3e}").parse().expect("a number")
}

/// Split on commas outside quotes.
fn split_args(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quote) = (Vec::new(), 0, None);
    for (i, c) in s.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            (',', None) => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The space: key to dimension, checked against train's flags.
pub fn parse_space(path: &Path, known: &[String]) -> Result<BTreeMap<String, Dim>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the search space {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("search space {}: {e}", path.display()))?;
    if table.is_empty() {
        bail!("search space {}: no keys", path.display());
    }
    let mut out = BTreeMap::new();
    for (k, v) in table {
        let flag = k.replace('_', "-");
        let what = format!("search space {}: {k}", path.display());
        if !known.contains(&flag) || ["out", "resume", "save", "config"].contains(&flag.as_str()) {
            bail!("{what}: not a train setting that can be searched");
        }
        let toml::Value::String(s) = v else {
            bail!("{what}: expected a string like \"log_uniform(1e-4, 1)\"");
        };
        out.insert(k, Dim::parse(&s, &what)?);
    }
    Ok(out)
}

/// A trial's settings and results per budget.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Trial {
    pub id: usize,
    pub params: BTreeMap<String, toml::Value>,
    /// Per rung: the budget and its result.
    pub runs: Vec<TrialRun>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrialRun {
    pub epochs: usize,
    /// Best validation accuracy (none when the trial failed).
    pub val_acc: Option<f64>,
    pub seconds: f64,
    /// "ok", or why it failed (diverged, an error).
    pub status: String,
}

/// The budgets of successive halving: `max / eta^(L-1), ..., max / eta, max` with as many
/// rungs `L` as the trials allow (each rung keeps `1/eta` of them), or from `min` up by
/// factors of `eta` when given; every budget at least 1 epoch.
pub fn rungs(max: usize, eta: usize, trials: usize, min: Option<usize>) -> Vec<usize> {
    if eta <= 1 {
        return vec![max];
    }
    if let Some(lo) = min {
        let mut r = Vec::new();
        let mut b = lo.max(1);
        while b < max {
            r.push(b);
            b *= eta;
        }
        r.push(max);
        return r;
    }
    let mut levels = 1u32;
    while trials / eta.pow(levels) >= 1 && max / eta.pow(levels) >= 1 {
        levels += 1;
    }
    let mut r: Vec<usize> = (0..levels)
        .rev()
        .map(|k| (max / eta.pow(k)).max(1))
        .collect();
    r.dedup();
    r
}

/// The ids promoted from a rung: the best `ceil(n / eta)` by validation accuracy (failed
/// trials never), ties to the lower id.
pub fn promote(results: &[(usize, Option<f64>)], eta: usize) -> Vec<usize> {
    let mut ok: Vec<(usize, f64)> = results
        .iter()
        .filter_map(|&(i, v)| v.map(|v| (i, v)))
        .collect();
    ok.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("finite").then(a.0.cmp(&b.0)));
    let keep = results.len().div_ceil(eta.max(1));
    let mut ids: Vec<usize> = ok.into_iter().take(keep).map(|x| x.0).collect();
    ids.sort();
    ids
}

/// The sweep's saved state.
#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    space: String,
    base: String,
    seed: u64,
    eta: usize,
    rungs: Vec<usize>,
    trials: Vec<Trial>,
}

fn save(dir: &Path, st: &State) -> Result<()> {
    regimen::io::write_atomic(
        &dir.join("sweep.json"),
        serde_json::to_string_pretty(st)?.as_bytes(),
    )?;
    Ok(())
}

fn toml_arg(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(_) => None,
        other => Some(other.to_string()),
    }
}

/// A trial's settings as `train` flags (`--lr=0.01`, `--nesterov`; a false switch is left out).
fn trial_flags(params: &BTreeMap<String, toml::Value>) -> Vec<String> {
    params
        .iter()
        .filter_map(|(k, v)| {
            let flag = format!("--{}", k.replace('_', "-"));
            match v {
                toml::Value::Boolean(true) => Some(flag),
                toml::Value::Boolean(false) => None,
                v => Some(format!("{flag}={}", toml_arg(v).expect("not a boolean"))),
            }
        })
        .collect()
}

/// Why a trial process failed: its last `error:` line (marked `diverged:` for a divergence),
/// or the signal that killed it (a kill, the out-of-memory killer).
fn failure_status(status: std::process::ExitStatus, stderr: &str) -> String {
    #[cfg(unix)]
    if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return format!("killed by signal {sig}");
    }
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("failed")
        .to_string();
    if line.contains("diverged") {
        format!("diverged: {line}")
    } else {
        line
    }
}

/// Whether a failed run is worth running again on the next run of the sweep: a trial killed
/// from outside, or one that could not start, says nothing about its hyperparameters (its
/// folder resumes from its checkpoint). An error or a divergence is the trial's own result.
fn retryable(status: &str) -> bool {
    status == "interrupted"
        || status.starts_with("killed by signal")
        || status.starts_with("could not start")
}

/// Records `run` as `trial`'s result at its budget. A retried run replaces the killed or
/// interrupted one and carries its seconds, so that the leaderboard counts all the time the
/// trial took.
fn record(trial: &mut Trial, mut run: TrialRun) {
    run.seconds += trial
        .runs
        .iter()
        .filter(|x| x.epochs == run.epochs)
        .map(|x| x.seconds)
        .sum::<f64>();
    trial.runs.retain(|x| x.epochs != run.epochs);
    trial.runs.push(run);
}

/// Whether `trial` still has to run at `budget` epochs.
fn to_run(trial: &Trial, budget: usize) -> bool {
    !trial
        .runs
        .iter()
        .any(|r| r.epochs == budget && !retryable(&r.status))
}

/// This program, with `--threads`.
fn regimen_cmd(threads: usize) -> std::process::Command {
    let exe = std::env::current_exe().expect("the running binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--threads").arg(threads.to_string());
    cmd
}

/// `regimen train` with the base config and a trial's settings at `epochs` (no --out).
fn train_cmd(
    base: Option<&Path>,
    params: &BTreeMap<String, toml::Value>,
    epochs: usize,
    threads: usize,
    force_validation: bool,
) -> std::process::Command {
    let mut cmd = regimen_cmd(threads);
    cmd.arg("train");
    if let Some(b) = base {
        cmd.arg("--config").arg(b);
    }
    cmd.args(trial_flags(params));
    cmd.arg(format!("--epochs={epochs}"));
    if force_validation {
        cmd.arg("--validation=0.1");
    }
    cmd
}

/// Checks every trial's settings as `regimen train` would (its flags, config and specs, with
/// no data read and nothing written), before any trial starts: a bad base config or a bad
/// value in the space is one error now, not a failure in every trial.
fn check_trials(
    base: Option<&Path>,
    trials: &[Trial],
    epochs: usize,
    force_validation: bool,
) -> Result<()> {
    for t in trials {
        let mut cmd = train_cmd(base, &t.params, epochs, 1, force_validation);
        cmd.arg("--check-only");
        let out = cmd
            .output()
            .with_context(|| "starting regimen train --check-only".to_string())?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or("failed");
            let params: Vec<String> = t.params.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            bail!(
                "trial {} ({}): {line}; no trial was started (fix the base config or the space)",
                t.id,
                params.join(", ")
            );
        }
    }
    Ok(())
}

/// Run one trial at `epochs` as a `regimen train` process; resumes its folder when a previous
/// process was killed.
fn run_trial(
    base: Option<&Path>,
    params: &BTreeMap<String, toml::Value>,
    epochs: usize,
    dir: &Path,
    threads: usize,
    force_validation: bool,
) -> TrialRun {
    let last = dir.join("checkpoints/last.safetensors");
    let mut cmd = if last.is_file() && !dir.join("summary.json").is_file() {
        let mut cmd = regimen_cmd(threads);
        cmd.args(["train", "--resume"]).arg(dir);
        cmd
    } else {
        let _ = std::fs::remove_dir_all(dir);
        let mut cmd = train_cmd(base, params, epochs, threads, force_validation);
        cmd.arg("--out").arg(dir);
        cmd
    };
    let start = std::time::Instant::now();
    let out = cmd.output();
    let seconds = start.elapsed().as_secs_f64();
    let failed = |status: String| TrialRun {
        epochs,
        val_acc: None,
        seconds,
        status,
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => return failed(format!("could not start: {e}")),
    };
    if !out.status.success() {
        return failed(failure_status(
            out.status,
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    let summary: serde_json::Value = match std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
    {
        Some(v) => v,
        None => return failed("no summary.json".into()),
    };
    TrialRun {
        epochs,
        val_acc: summary["best_val_accuracy"].as_f64(),
        seconds,
        status: "ok".into(),
    }
}

/// Raised by Ctrl-C: no new trial starts, the running ones end (they are interrupted too, and
/// keep their checkpoints), and the sweep stops with its state saved.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn run(args: &SweepArgs) -> Result<()> {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A second Ctrl-C: at once.
            std::process::exit(130);
        }
        tell!("\ninterrupt: stopping the sweep after the running trials");
    });
    crate::check_range("--trials", args.trials, 1, 10_000)?;
    crate::check_range("--jobs", args.jobs, 1, 64)?;
    crate::check_range("--eta", args.eta, 1, 100)?;
    let known = crate::config::train_flags();
    let space = parse_space(&args.space, &known)?;
    // The base config, read the way train reads it (its errors name the file and key).
    let base_table: toml::Table = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the config file {}", p.display()))?;
            text.parse()
                .map_err(|e| anyhow!("config {}: {e}", p.display()))?
        }
        None => toml::Table::new(),
    };
    let max_epochs = match base_table.get("epochs") {
        Some(toml::Value::Integer(e)) if *e >= 1 => *e as usize,
        Some(_) => bail!("config: epochs must be a whole number >= 1"),
        None => 20,
    };
    if space.contains_key("epochs") {
        bail!("search space {}: epochs: the budget is the sweep's (successive halving), not a hyperparameter", args.space.display());
    }
    let validation = match base_table.get("validation") {
        Some(toml::Value::Float(v)) => *v,
        Some(toml::Value::Integer(v)) => *v as f64,
        _ => 0.1,
    };
    let force_validation = validation <= 0.0;
    if let Some(m) = args.min_epochs.filter(|&m| m == 0 || m > max_epochs) {
        bail!("invalid --min-epochs {m}: must be from 1 to the config's epochs ({max_epochs})");
    }
    let rungs = rungs(max_epochs, args.eta, args.trials, args.min_epochs);
    let out = match &args.out {
        Some(d) => d.clone(),
        None => PathBuf::from("runs").join(format!("sweep-{}", std::process::id())),
    };
    crate::check_output_folder(&out, "sweep.json", "a sweep's folder")?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // How to continue this sweep: its default folder is named by this process, so a new process
    // finds it only through --out.
    let again = match &args.out {
        Some(_) => "run the same command again".to_string(),
        None => format!("run the same command with --out {}", out.display()),
    };
    let space_text = std::fs::read_to_string(&args.space)?;
    let base_text = toml::to_string(&base_table)?;
    // Draw the trials (the same seed draws the same trials, so a restart finds them again).
    let mut rng = Rng::new(args.seed);
    let drawn: Vec<Trial> = (0..args.trials)
        .map(|id| Trial {
            id,
            params: space
                .iter()
                .map(|(k, d)| (k.clone(), d.sample(&mut rng)))
                .collect(),
            runs: Vec::new(),
        })
        .collect();
    // Every drawn value must be one `train` takes (a whole number for --batch-size, a name it
    // knows): found now, not as N failed trials.
    for t in &drawn {
        for (k, v) in &t.params {
            let one = BTreeMap::from([(k.clone(), v.clone())]);
            let argv = ["regimen".to_string(), "train".to_string()]
                .into_iter()
                .chain(trial_flags(&one));
            if let Err(e) = <crate::Cli as clap::Parser>::try_parse_from(argv) {
                let text = e.to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                bail!(
                    "search space {}: {k}: the drawn value {v} is refused by train: {first}",
                    args.space.display()
                );
            }
        }
    }
    let mut st = match std::fs::read_to_string(out.join("sweep.json")) {
        Ok(text) => {
            let st: State = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a sweep state", out.join("sweep.json").display())
            })?;
            if st.space != space_text
                || st.base != base_text
                || st.seed != args.seed
                || st.eta != args.eta
                || st.rungs != rungs
                || st.trials.len() != args.trials
            {
                bail!(
                    "{} holds another sweep (a different space, config, seed, eta or trial count): give another --out",
                    out.display()
                );
            }
            say!("resuming the sweep in {}", out.display());
            st
        }
        Err(_) => State {
            space: space_text,
            base: base_text,
            seed: args.seed,
            eta: args.eta,
            rungs: rungs.clone(),
            trials: drawn,
        },
    };
    // Before anything is saved: a sweep refused here leaves no state to be refused again.
    check_trials(
        args.config.as_deref(),
        &st.trials,
        *rungs.last().expect("at least one rung"),
        force_validation,
    )?;
    save(&out, &st)?;
    if force_validation {
        say!("the base config holds out no validation split: every trial holds out 10% of the training set to compare on");
    }
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / args.jobs).max(1);
    say!(
        "sweep: {} trials of {} hyperparameters, budgets {:?} epochs (successive halving, eta {}), {} at a time with {} threads each; folder {}",
        args.trials,
        space.len(),
        rungs,
        args.eta,
        args.jobs,
        threads,
        out.display()
    );
    let mut alive: Vec<usize> = (0..args.trials).collect();
    for (level, &budget) in rungs.iter().enumerate() {
        let todo: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|&i| to_run(&st.trials[i], budget))
            .collect();
        say!(
            "rung {}: {} trials at {budget} epochs ({} already done)",
            level + 1,
            alive.len(),
            alive.len() - todo.len()
        );
        let base = args.config.as_deref();
        let mut queue = todo.into_iter();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0;
        loop {
            while running < args.jobs && !STOP.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(i) = queue.next() else { break };
                let params = st.trials[i].params.clone();
                let dir = out.join("trials").join(format!("trial-{i:03}-e{budget}"));
                let tx = tx.clone();
                let base = base.map(Path::to_path_buf);
                std::thread::spawn(move || {
                    let r = run_trial(
                        base.as_deref(),
                        &params,
                        budget,
                        &dir,
                        threads,
                        force_validation,
                    );
                    let _ = tx.send((i, r));
                });
                running += 1;
            }
            if running == 0 {
                break;
            }
            let (i, r) = rx.recv().expect("a trial thread reports");
            running -= 1;
            let stopping = STOP.load(std::sync::atomic::Ordering::SeqCst);
            if stopping && r.status != "ok" {
                // Interrupted with the sweep (Ctrl-C reaches the trials too): not a failure;
                // the next run of the sweep resumes the trial from its checkpoint.
                say!("  trial {i:>3} at {budget} epochs: interrupted");
                record(
                    &mut st.trials[i],
                    TrialRun {
                        status: "interrupted".into(),
                        val_acc: None,
                        ..r
                    },
                );
                save(&out, &st)?;
                continue;
            }
            say!(
                "  trial {i:>3} at {budget} epochs: {} ({:.1} s){}",
                match r.val_acc {
                    Some(a) => format!("validation accuracy {:.2}%", 100.0 * a),
                    None => r.status.clone(),
                },
                r.seconds,
                if retryable(&r.status) {
                    format!("; {again} to retry it")
                } else {
                    String::new()
                }
            );
            record(&mut st.trials[i], r);
            save(&out, &st)?;
        }
        if STOP.load(std::sync::atomic::Ordering::SeqCst) {
            say!(
                "interrupted: the sweep is saved in {}; {again} to continue it",
                out.display()
            );
            std::process::exit(130);
        }
        if level + 1 < rungs.len() {
            let results: Vec<(usize, Option<f64>)> = alive
                .iter()
                .map(|&i| {
                    (
                        i,
                        st.trials[i]
                            .runs
                            .iter()
                            .find(|r| r.epochs == budget)
                            .and_then(|r| r.val_acc),
                    )
                })
                .collect();
            alive = promote(&results, args.eta);
            if alive.is_empty() {
                bail!(
                    "every trial of rung {} failed; see {}",
                    level + 1,
                    out.join("sweep.json").display()
                );
            }
        }
    }
    report(&out, &st, &space, &base_table, max_epochs)?;
    let last = *rungs.last().expect("at least one rung");
    let finished = st
        .trials
        .iter()
        .flat_map(|t| &t.runs)
        .any(|r| r.epochs == last && r.val_acc.is_some());
    if !finished {
        let why = st
            .trials
            .iter()
            .flat_map(|t| &t.runs)
            .map(|r| r.status.as_str())
            .find(|s| *s != "ok")
            .unwrap_or("no validation accuracy");
        bail!(
            "no trial finished the full budget of {last} epochs (the first failure: {why}); see {}",
            out.join("sweep.json").display()
        );
    }
    Ok(())
}

/// The leaderboard (Markdown, CSV), one plot per hyperparameter and the best config.
fn report(
    out: &Path,
    st: &State,
    space: &BTreeMap<String, Dim>,
    base: &toml::Table,
    max_epochs: usize,
) -> Result<()> {
    let best_of = |t: &Trial| -> (usize, Option<f64>) {
        let top = t.runs.iter().map(|r| r.epochs).max().unwrap_or(0);
        (
            top,
            t.runs
                .iter()
                .find(|r| r.epochs == top)
                .and_then(|r| r.val_acc),
        )
    };
    let mut order: Vec<&Trial> = st.trials.iter().collect();
    order.sort_by(|a, b| {
        let (ea, va) = best_of(a);
        let (eb, vb) = best_of(b);
        eb.cmp(&ea)
            .then(
                vb.unwrap_or(-1.0)
                    .partial_cmp(&va.unwrap_or(-1.0))
                    .expect("finite"),
            )
            .then(a.id.cmp(&b.id))
    });
    let keys: Vec<&String> = space.keys().collect();
    let mut csv = format!(
        "trial,{},epochs_reached,best_val_accuracy,seconds,status\n",
        keys.iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut md = format!(
        "# Sweep leaderboard\n\n{} trials; budgets {:?} epochs (successive halving, eta {}); ranked by the largest budget reached, then validation accuracy.\n\n| rank | trial | {} | epochs | best val acc | time (s) | status |\n|{}\n",
        st.trials.len(),
        st.rungs,
        st.eta,
        keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(keys.len() + 6)
    );
    for (rank, t) in order.iter().enumerate() {
        let (e, v) = best_of(t);
        let secs: f64 = t.runs.iter().map(|r| r.seconds).sum();
        let status = t.runs.last().map_or("not run", |r| r.status.as_str());
        let vals: Vec<String> = keys
            .iter()
            .map(|k| toml_arg(&t.params[*k]).unwrap_or_else(|| t.params[*k].to_string()))
            .collect();
        csv += &format!(
            "{},{},{e},{},{secs:.1},\"{}\"\n",
            t.id,
            vals.iter()
                .map(|v| format!("\"{}\"", v.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(","),
            v.map_or(String::new(), |v| format!("{v:.4}")),
            status.replace('"', "'")
        );
        md += &format!(
            "| {} | {} | {} | {e} | {} | {secs:.1} | {} |\n",
            rank + 1,
            t.id,
            vals.iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(" | "),
            v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            status.replace('|', "/")
        );
    }
    regimen::io::write_atomic(&out.join("leaderboard.csv"), csv.as_bytes())?;
    // The best config: the base with the winner's settings, at the full budget.
    let winner = order.first().filter(|t| best_of(t).1.is_some());
    if let Some(w) = winner {
        let mut cfg = base.clone();
        for (k, v) in &w.params {
            cfg.insert(k.clone(), v.clone());
        }
        cfg.insert("epochs".into(), toml::Value::Integer(max_epochs as i64));
        let text = format!(
            "# The best trial ({}) of the sweep in this folder: validation accuracy {:.2}% at {} epochs.\n{}",
            w.id,
            100.0 * best_of(w).1.unwrap_or(0.0),
            best_of(w).0,
            toml::to_string(&cfg)?
        );
        regimen::io::write_atomic(&out.join("best.toml"), text.as_bytes())?;
        md += &format!(
            "\nThe best configuration is `best.toml` (`regimen train --config {}`).\n",
            out.join("best.toml").display()
        );
    }
    // Validation accuracy against each numeric hyperparameter, at each budget.
    for (k, d) in space {
        let mut by_budget: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
        for t in &st.trials {
            let x = match &t.params[k] {
                toml::Value::Float(f) => *f,
                toml::Value::Integer(i) => *i as f64,
                _ => continue,
            };
            for r in &t.runs {
                if let Some(v) = r.val_acc {
                    by_budget
                        .entry(r.epochs)
                        .or_default()
                        .push((if d.is_log() { x.log10() } else { x }, 100.0 * v));
                }
            }
        }
        if by_budget.is_empty() {
            continue;
        }
        let series: Vec<Series> = by_budget
            .into_iter()
            .map(|(e, mut pts)| {
                pts.sort_by(|a, b| a.0.partial_cmp(&b.0).expect("finite"));
                Series::new(&format!("{e} epoch{}", if e == 1 { "" } else { "s" }), pts)
            })
            .collect();
        let file = format!("sweep-{k}.png");
        plot::points(
            &out.join(&file),
            &Plot {
                title: &format!("Validation accuracy against {k}"),
                x_label: &if d.is_log() {
                    format!("log10 {k}")
                } else {
                    k.clone()
                },
                y_label: "validation accuracy (%)",
                log_y: false,
            },
            &series,
        )?;
        md += &format!("\n![validation accuracy against {k}]({file})\n");
    }
    regimen::io::write_atomic(&out.join("leaderboard.md"), md.as_bytes())?;
    say!(
        "{}",
        md.lines()
            .take(4 + st.trials.len().min(10))
            .collect::<Vec<_>>()
            .join("\n")
    );
    say!(
        "leaderboard: {} and {}",
        out.join("leaderboard.md").display(),
        out.join("leaderboard.csv").display()
    );
    if winner.is_some() {
        say!("best configuration: {}", out.join("best.toml").display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_trial_is_retried_and_its_own_failures_are_not() {
        use std::os::unix::process::ExitStatusExt;
        let status =
            |raw: i32, err: &str| failure_status(std::process::ExitStatus::from_raw(raw), err);
        // Killed by SIGKILL (the out-of-memory killer, a stray kill): raw wait status 9.
        assert_eq!(status(9, ""), "killed by signal 9");
        // Exit 2 with an error line; a divergence is marked.
        assert_eq!(
            status(2 << 8, "note\nerror: invalid --lr 0"),
            "error: invalid --lr 0"
        );
        assert!(status(2 << 8, "error: training diverged: the loss").starts_with("diverged: "));
        assert_eq!(status(1 << 8, ""), "failed");
        let run = |epochs, status: &str| TrialRun {
            epochs,
            val_acc: None,
            seconds: 1.0,
            status: status.into(),
        };
        let trial = |runs| Trial {
            id: 0,
            params: BTreeMap::new(),
            runs,
        };
        assert!(to_run(&trial(vec![]), 20));
        assert!(!to_run(&trial(vec![run(20, "ok")]), 20));
        assert!(to_run(&trial(vec![run(20, "ok")]), 60), "another budget");
        assert!(to_run(&trial(vec![run(20, "killed by signal 9")]), 20));
        assert!(to_run(
            &trial(vec![run(20, "could not start: No such file")]),
            20
        ));
        assert!(!to_run(
            &trial(vec![run(20, "diverged: error: training diverged")]),
            20
        ));
        assert!(!to_run(&trial(vec![run(20, "error: out of memory")]), 20));
        assert!(to_run(&trial(vec![run(20, "interrupted")]), 20));
    }

    #[test]
    fn a_retried_run_replaces_the_killed_one_and_keeps_its_seconds() {
        let run = |epochs, seconds, status: &str| TrialRun {
            epochs,
            val_acc: (status == "ok").then_some(0.5),
            seconds,
            status: status.into(),
        };
        let mut t = Trial {
            id: 0,
            params: BTreeMap::new(),
            runs: vec![run(5, 2.0, "ok")],
        };
        record(&mut t, run(20, 3.0, "interrupted"));
        record(&mut t, run(20, 4.0, "killed by signal 9"));
        record(&mut t, run(20, 5.0, "ok"));
        assert_eq!(t.runs, vec![run(5, 2.0, "ok"), run(20, 12.0, "ok")]);
    }

    #[test]
    fn distributions_parse_and_refuse() {
        assert_eq!(
            Dim::parse("log_uniform(1e-4, 1)", "k").unwrap(),
            Dim::LogUniform(1e-4, 1.0)
        );
        assert_eq!(Dim::parse("int(1, 4)", "k").unwrap(), Dim::Int(1, 4));
        assert_eq!(
            Dim::parse("choice(\"a,b\", 'c')", "k").unwrap(),
            Dim::Choice(vec![
                toml::Value::String("a,b".into()),
                toml::Value::String("c".into())
            ])
        );
        for (bad, why) in [
            ("log_uniform(0, 1)", "bounds > 0"),
            ("uniform(2, 1)", "lower bound"),
            ("choice()", "at least one"),
            ("normal(0, 1)", "unknown distribution"),
            ("choice(sgd)", "quote strings"),
            ("int(1.5, 3)", "whole bounds"),
        ] {
            let e = Dim::parse(bad, "space.toml: lr").unwrap_err().to_string();
            assert!(
                e.starts_with("space.toml: lr: ") && e.contains(why),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn draws_stay_in_their_ranges() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let toml::Value::Float(v) = Dim::LogUniform(1e-4, 1.0).sample(&mut rng) else {
                panic!()
            };
            assert!((1e-4..=1.0).contains(&v));
            let toml::Value::Integer(i) = Dim::Int(2, 4).sample(&mut rng) else {
                panic!()
            };
            assert!((2..=4).contains(&i));
        }
    }

    #[test]
    fn successive_halving_budgets_and_promotion() {
        assert_eq!(rungs(20, 4, 16, None), vec![1, 5, 20]);
        assert_eq!(rungs(20, 4, 16, Some(2)), vec![2, 8, 20]);
        assert_eq!(rungs(10, 1, 16, None), vec![10]);
        assert_eq!(rungs(3, 3, 9, None), vec![1, 3]);
        // A scripted objective: the best quarter goes up, failed trials never, ties by id.
        let results: Vec<(usize, Option<f64>)> = (0..8)
            .map(|i| {
                (
                    i,
                    if i == 5 {
                        None
                    } else {
                        Some([0.5, 0.9, 0.7, 0.9, 0.1, 0.0, 0.3, 0.8][i])
                    },
                )
            })
            .collect();
        assert_eq!(promote(&results, 4), vec![1, 3]);
        assert_eq!(promote(&results, 2), vec![1, 2, 3, 7]);
        assert_eq!(promote(&[(0, None), (1, None)], 2), Vec::<usize>::new());
    }
}
