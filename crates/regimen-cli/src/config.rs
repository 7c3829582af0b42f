//! `regimen train --config FILE`: a TOML file whose keys are `train`'s long flags
//! (`lr = 0.05`, `schedule = "cosine"`, `augment = "crop=2,flip,cutmix=1.0"`, `nesterov = true`;
//! `-` or `_` alike). Flags given on the command line win over the file. Unknown keys and
//! values of the wrong kind are errors naming the file and the key.

use anyhow::{anyhow, bail, Context, Result};
use clap::CommandFactory;

/// The long flags `train` accepts (its own and the global ones).
pub fn train_flags() -> Vec<String> {
    let cmd = crate::Cli::command();
    let globals = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string));
    let train = cmd.find_subcommand("train").expect("train subcommand");
    train
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long().map(str::to_string))
        .chain(globals)
        .filter(|f| f != "config" && f != "help" && f != "version")
        .collect()
}

/// The long flags of `train` (and the global ones) that take no value: `true` or `false` in a
/// config file.
fn switch_flags() -> Vec<String> {
    let cmd = crate::Cli::command();
    let train = cmd.find_subcommand("train").expect("train subcommand");
    train
        .get_arguments()
        .chain(cmd.get_arguments())
        .filter(|a| !a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// The file `--config` named (set by [`expand`]), so that a run may go into the folder that
/// holds its own config.
pub static GIVEN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The arguments with `--config FILE` expanded, and where each flag from the file came from.
pub struct Expanded {
    pub args: Vec<String>,
    /// `(flag, key, file)` of every flag taken from a config file.
    pub from_file: Vec<(String, String, String)>,
}

/// Expand `--config FILE` of `regimen train` into flags placed before the command line's own.
pub fn expand(args: Vec<String>) -> Result<Expanded> {
    let Some(ti) = args.iter().position(|a| a == "train" || a == "lr-find") else {
        return Ok(Expanded {
            args,
            from_file: Vec::new(),
        });
    };
    let (mut path, mut rest) = (None, Vec::new());
    let mut i = ti + 1;
    while i < args.len() {
        if (args[i] == "--config" || args[i].starts_with("--config=")) && path.is_some() {
            bail!("--config given twice: give one file (flags on the command line override it)");
        }
        if args[i] == "--config" {
            path = Some(
                args.get(i + 1)
                    .cloned()
                    .ok_or_else(|| anyhow!("--config needs a file"))?,
            );
            i += 2;
        } else if let Some(p) = args[i].strip_prefix("--config=") {
            path = Some(p.to_string());
            i += 1;
        } else {
            rest.push(args[i].clone());
            i += 1;
        }
    }
    // `--resume DIR` reads the run's resolved config; only a few flags may change.
    let resume = rest.iter().enumerate().find_map(|(i, a)| {
        if a == "--resume" {
            Some(rest.get(i + 1).cloned().unwrap_or_default())
        } else {
            a.strip_prefix("--resume=").map(str::to_string)
        }
    });
    if let Some(dir) = resume {
        let times = rest
            .iter()
            .filter(|a| *a == "--resume" || a.starts_with("--resume="))
            .count();
        if times > 1 {
            bail!("--resume given {times} times: give one run folder");
        }
        if path.is_some() {
            bail!("--resume takes the run's own config ({dir}/config.toml): give no --config");
        }
        if dir.is_empty() {
            bail!("--resume needs the run folder");
        }
        let mut skip = false;
        for a in &rest {
            if std::mem::take(&mut skip) {
                continue;
            }
            if a == "--resume" {
                skip = true;
                continue;
            }
            let flag = a.split('=').next().unwrap_or("");
            if flag.starts_with("--")
                && !flag.starts_with("--resume")
                && !crate::train_cmd::RESUME_FLAGS.contains(&flag)
            {
                bail!(
                    "{flag} cannot change when resuming: the run's settings come from {dir}/config.toml (only {} may be given with --resume)",
                    crate::train_cmd::RESUME_FLAGS.join(", ")
                );
            }
        }
        let config = std::path::Path::new(&dir).join("config.toml");
        if !config.is_file() {
            bail!(
                "--resume {dir}: no {} (is this a run folder of regimen train?)",
                config.display()
            );
        }
        path = Some(config.display().to_string());
    }
    let Some(path) = path else {
        return Ok(Expanded {
            args,
            from_file: Vec::new(),
        });
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {path}"))?;
    if let Ok(p) = std::fs::canonicalize(&path) {
        let _ = GIVEN.set(p);
    }
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("{}", toml_error(&path.to_string(), &text, &e)))?;
    let known = train_flags();
    let switches = switch_flags();
    let mut from_file = Vec::new();
    let mut origins = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if let Some((_, other)) = seen.iter().find(|(f, _)| *f == flag) {
            bail!("config {path}: {other} and {key} are the same setting: keep one");
        }
        seen.push((flag.clone(), key.clone()));
        if flag == "resume" {
            bail!(
                "config {path}: resume cannot be set in a config file: continue a run with \
                 `regimen train --resume DIR` (its settings come from DIR/config.toml)"
            );
        }
        if !known.contains(&flag) {
            bail!(
                "config {path}: unknown key {key:?}; accepted: {}",
                known.join(", ")
            );
        }
        if switches.contains(&flag) && !matches!(value, toml::Value::Boolean(_)) {
            bail!("config {path}: {key} = {value}: expected true or false");
        }
        origins.push((
            format!("--{flag}"),
            format!("{key} = {value}"),
            path.clone(),
        ));
        match value {
            toml::Value::String(s) => from_file.extend([format!("--{flag}"), s]),
            toml::Value::Integer(n) => from_file.push(format!("--{flag}={n}")),
            toml::Value::Float(f) => from_file.push(format!("--{flag}={f}")),
            toml::Value::Boolean(true) => from_file.push(format!("--{flag}")),
            toml::Value::Boolean(false) => {}
            other => {
                bail!("config {path}: {key} = {other}: expected a string, a number or a boolean")
            }
        }
    }
    Ok(Expanded {
        args: args[..=ti]
            .iter()
            .cloned()
            .chain(from_file)
            .chain(rest)
            .collect(),
        from_file: origins,
    })
}

/// A TOML error on one line: "config FILE line L, column C: MESSAGE" (toml's own display is
/// several lines with a caret drawing).
pub fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("config {path} line {line}, column {column}: {message}")
        }
        None => format!("config {path}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Fuzzing the config files: edits of a valid TOML file (from its own alphabet) give an
    /// error or a parse, never a panic. `REGIMEN_FUZZ_CASES` (default 300) or
    /// `REGIMEN_FUZZ_SECONDS` set the budget, as for the library's fuzz targets.
    #[test]
    fn fuzz_config_files() {
        let seed = "lr = 0.05\nschedule = \"onecycle:pct=0.2\"\naugment = \"crop=2,flip\"\nnesterov = true\nmomentum = 0.9\nepochs = 3\nbatch_size = 64\n";
        let alphabet: Vec<char> = "=\"'[]{}.,:#\n \\-_+0123456789eEtruefalsnlrmpochs"
            .chars()
            .collect();
        let cases: usize = std::env::var("REGIMEN_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let limit = std::env::var("REGIMEN_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        let path =
            std::env::temp_dir().join(format!("regimen-fuzz-cfg-{}.toml", std::process::id()));
        let start = std::time::Instant::now();
        let mut r = regimen::Rng::new(7);
        let mut done = 0usize;
        while (limit.is_none() && done < cases) || limit.is_some_and(|l| start.elapsed() < l) {
            let mut text: Vec<char> = seed.chars().collect();
            for _ in 0..1 + r.below(6) {
                let n = text.len();
                match r.below(3) {
                    0 if n > 0 => {
                        text.remove(r.below(n));
                    }
                    1 => text.insert(r.below(n + 1), alphabet[r.below(alphabet.len())]),
                    _ if n > 0 => text[r.below(n)] = alphabet[r.below(alphabet.len())],
                    _ => {}
                }
            }
            let s: String = text.into_iter().collect();
            std::fs::write(&path, &s).unwrap();
            let args: Vec<String> = ["regimen", "train", "--config", path.to_str().unwrap()]
                .iter()
                .map(|a| a.to_string())
                .collect();
            let ok = std::panic::catch_unwind(|| {
                if let Ok(e) = expand(args) {
                    let _ = crate::Cli::try_parse_from(e.args);
                }
            });
            assert!(ok.is_ok(), "a panic on the config file:\n{s}");
            done += 1;
        }
        let _ = std::fs::remove_file(&path);
        tell!(
            "fuzz config files: {done} cases in {:.1} s, no finding",
            start.elapsed().as_secs_f64()
        );
    }
}
