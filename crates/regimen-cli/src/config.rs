//! `regimen train --config FILE`: a TOML file whose keys are `train`'s long flags
//! (`lr = 0.05`, `schedule = "cosine"`, `augment = "crop=2,flip,cutmix=1.0"`, `nesterov = true`;
//! `-` or `_` alike). Flags given on the command line win over the file. Unknown keys and
//! values of the wrong kind are errors naming the file and the key.

use anyhow::{anyhow, bail, Context, Result};
use clap::CommandFactory;

/// The long flags `train` accepts (its own and the global ones).
fn train_flags() -> Vec<String> {
    let cmd = crate::Cli::command();
    let globals = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string));
    let train = cmd.find_subcommand("train").expect("train subcommand");
    train
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .chain(globals)
        .filter(|f| f != "config" && f != "help" && f != "version")
        .collect()
}

/// The arguments with `--config FILE` expanded, and where each flag from the file came from.
pub struct Expanded {
    pub args: Vec<String>,
    /// `(flag, key, file)` of every flag taken from a config file.
    pub from_file: Vec<(String, String, String)>,
}

/// Expand `--config FILE` of `regimen train` into flags placed before the command line's own.
pub fn expand(args: Vec<String>) -> Result<Expanded> {
    let Some(ti) = args.iter().position(|a| a == "train") else {
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
    let Some(path) = path else {
        return Ok(Expanded {
            args,
            from_file: Vec::new(),
        });
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {path}"))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow!("config {path}: {e}"))?;
    let known = train_flags();
    let mut from_file = Vec::new();
    let mut origins = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) {
            bail!(
                "config {path}: unknown key {key:?}; accepted: {}",
                known.join(", ")
            );
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
