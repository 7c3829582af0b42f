//! Schedules from text, as the command line and configs write them:
//! `NAME` or `NAME:key=value,key=value`, for example `cosine`, `step:size=30,gamma=0.1`,
//! `multistep:milestones=30/60/80`, `cyclic:min=0.001,up=2000,mode=triangular2`,
//! `onecycle:pct=0.2`. Unknown names or keys are errors that list what is accepted.
//!
//! | name | keys (defaults) |
//! |---|---|
//! | `constant` | — |
//! | `step` | `size` (required), `gamma` (0.1) |
//! | `multistep` | `milestones` (`a/b/c`, required), `gamma` (0.1) |
//! | `exp` | `gamma` (required) |
//! | `cosine` | `min` (0): over all steps after the warmup |
//! | `linear` | — : linear decay to 0 over all steps after the warmup |
//! | `poly` | `power` (1, as PyTorch's `PolynomialLR`) |
//! | `cyclic` | `min` (lr / 10), `max` (lr), `up` (steps / 10), `down` (= up), `mode` (triangular, triangular2, exp_range), `gamma` (1) |
//! | `onecycle` | `pct` (0.3), `div` (25), `final_div` (1e4), `anneal` (cos, linear), `three_phase` (false) |
//! | `restarts` | `t0` (steps / 10), `mult` (1), `min` (0) |
//! | `plateau` | `factor` (0.1), `patience` (10), `threshold` (1e-4), `cooldown` (0), `min_lr` (0) |
//!
//! A warmup (`warmup` steps W, linear from lr/(W+1), so that even its first step moves the weights,
//! or constant at `factor`) goes in front of any of
//! them except `onecycle`, which has its own.

use std::collections::BTreeMap;

use super::*;
use crate::error::{Error, Result};

/// A parsed `NAME:key=value,...`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleSpec {
    pub name: String,
    pub args: BTreeMap<String, String>,
}

impl ScheduleSpec {
    pub fn parse(spec: &str) -> Result<ScheduleSpec> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let mut args = BTreeMap::new();
        for kv in rest.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            if let Some(first) = args.insert(k.trim().to_string(), v.trim().to_string()) {
                return Err(Error::config(
                    &format!("schedule {} {}", name.trim(), k.trim()),
                    v.trim(),
                    &format!("given twice (first {first})"),
                ));
            }
        }
        Ok(ScheduleSpec {
            name: name.trim().to_string(),
            args,
        })
    }
}

struct Args<'a> {
    name: &'a str,
    args: &'a BTreeMap<String, String>,
}

impl Args<'_> {
    fn field(&self, key: &str) -> String {
        format!("schedule {} {key}", self.name)
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Result<T> {
        match self.args.get(key) {
            Some(v) => v
                .parse()
                .map_err(|_| Error::config(&self.field(key), v, "is not a valid number")),
            None => {
                default.ok_or_else(|| Error::config(&self.field(key), "(missing)", "is required"))
            }
        }
    }
    fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self.args.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(Error::config(
                &self.field(k),
                &self.args[k],
                &format!(
                    "unknown key; accepted: {}",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                ),
            )),
            None => Ok(()),
        }
    }
}

/// Build the schedule `spec` for base learning rate `lr` over `total` steps, with `warmup`
/// steps of warmup in front (`warmup_factor`: `None` for a linear ramp from lr/(W+1), `Some(f)` for
/// a constant `f lr`).
pub fn parse_schedule(
    spec: &str,
    lr: f64,
    total: usize,
    warmup: usize,
    warmup_factor: Option<f64>,
) -> Result<Box<dyn Schedule>> {
    let s = ScheduleSpec::parse(spec)?;
    let a = Args {
        name: &s.name,
        args: &s.args,
    };
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(Error::config("lr", lr, "must be a finite number > 0"));
    }
    if warmup > 0 && warmup >= total {
        return Err(Error::config(
            "warmup",
            warmup,
            &format!("must be shorter than the {total} steps of training"),
        ));
    }
    let rest = total.saturating_sub(warmup).max(1);
    let tenth = (rest / 10).max(1);
    let positive = |key: &str, v: f64| -> Result<f64> {
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(Error::config(
                &a.field(key),
                v,
                "must be a finite number > 0",
            ))
        }
    };
    let inner: Box<dyn Schedule> = match s.name.as_str() {
        "constant" => {
            a.check_keys(&[])?;
            Box::new(Constant(lr))
        }
        "step" => {
            a.check_keys(&["size", "gamma"])?;
            let size: usize = a.num("size", None)?;
            if size == 0 {
                return Err(Error::config(&a.field("size"), 0, "must be at least 1"));
            }
            Box::new(StepDecay { base: lr, step_size: size, gamma: positive("gamma", a.num("gamma", Some(0.1))?)? })
        }
        "multistep" => {
            a.check_keys(&["milestones", "gamma"])?;
            let raw = s.args.get("milestones").ok_or_else(|| Error::config(&a.field("milestones"), "(missing)", "is required, like 30/60/80"))?;
            let milestones: Vec<usize> = raw
                .split('/')
                .map(|m| m.parse().map_err(|_| Error::config(&a.field("milestones"), raw, "must be step numbers separated by '/'")))
                .collect::<Result<_>>()?;
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::config(&a.field("milestones"), raw, "must increase"));
            }
            Box::new(MultiStep { base: lr, milestones, gamma: positive("gamma", a.num("gamma", Some(0.1))?)? })
        }
        "exp" => {
            a.check_keys(&["gamma"])?;
            Box::new(Exponential { base: lr, gamma: positive("gamma", a.num("gamma", None)?)? })
        }
        "cosine" => {
            a.check_keys(&["min"])?;
            Box::new(Cosine { base: lr, t_max: rest, eta_min: a.num("min", Some(0.0))? })
        }
        "linear" => {
            a.check_keys(&[])?;
            Box::new(Polynomial { base: lr, total: rest, power: 1.0 })
        }
        "poly" => {
            a.check_keys(&["power"])?;
            Box::new(Polynomial { base: lr, total: rest, power: positive("power", a.num("power", Some(1.0))?)? })
        }
        "cyclic" => {
            a.check_keys(&["min", "max", "up", "down", "mode", "gamma"])?;
            let up: usize = a.num("up", Some(tenth))?;
            let mode = match s.args.get("mode").map(String::as_str).unwrap_or("triangular") {
                "triangular" => CyclicMode::Triangular,
                "triangular2" => CyclicMode::Triangular2,
                "exp_range" => CyclicMode::ExpRange { gamma: positive("gamma", a.num("gamma", Some(1.0))?)? },
                other => return Err(Error::config(&a.field("mode"), other, "expected triangular, triangular2 or exp_range")),
            };
            let (min, max) = (a.num("min", Some(lr / 10.0))?, a.num("max", Some(lr))?);
            if up == 0 {
                return Err(Error::config(&a.field("up"), up, "must be at least 1"));
            }
            if !(min < max) {
                return Err(Error::config(&a.field("min"), min, &format!("needs min < max (max = {max})")));
            }
            Box::new(Cyclic { base: min, max, up, down: a.num("down", Some(up))?, mode })
        }
        "onecycle" => {
            a.check_keys(&["pct", "div", "final_div", "anneal", "three_phase"])?;
            if warmup > 0 {
                return Err(Error::config("warmup", warmup, "onecycle has its own warmup (pct); drop --warmup"));
            }
            let pct: f64 = a.num("pct", Some(0.3))?;
            if !(pct > 0.0 && pct < 1.0) {
                return Err(Error::config(&a.field("pct"), pct, "must be in (0, 1)"));
            }
            let anneal = match s.args.get("anneal").map(String::as_str).unwrap_or("cos") {
                "cos" => Anneal::Cos,
                "linear" => Anneal::Linear,
                other => return Err(Error::config(&a.field("anneal"), other, "expected cos or linear")),
            };
            return Ok(Box::new(OneCycle {
                max: lr,
                total,
                pct_start: pct,
                div: positive("div", a.num("div", Some(25.0))?)?,
                final_div: positive("final_div", a.num("final_div", Some(1e4))?)?,
                anneal,
                three_phase: a.num("three_phase", Some(false))?,
            }));
        }
        "restarts" => {
            a.check_keys(&["t0", "mult", "min"])?;
            let t_0: usize = a.num("t0", Some(tenth))?;
            let t_mult: usize = a.num("mult", Some(1))?;
            if t_0 == 0 {
                return Err(Error::config(&a.field("t0"), t_0, "must be at least 1"));
            }
            if t_mult == 0 {
                return Err(Error::config(&a.field("mult"), t_mult, "must be at least 1"));
            }
            Box::new(CosineRestarts { base: lr, t_0, t_mult, eta_min: a.num("min", Some(0.0))? })
        }
        "plateau" => {
            a.check_keys(&["factor", "patience", "threshold", "cooldown", "min_lr"])?;
            let factor: f64 = a.num("factor", Some(0.1))?;
            if !(factor > 0.0 && factor < 1.0) {
                return Err(Error::config(&a.field("factor"), factor, "must be in (0, 1)"));
            }
            Box::new(ReduceOnPlateau::new(lr, factor, a.num("patience", Some(10))?, a.num("threshold", Some(1e-4))?, a.num("cooldown", Some(0))?, a.num("min_lr", Some(0.0))?))
        }
        other => {
            return Err(Error::config(
                "schedule",
                other,
                "expected constant, step, multistep, exp, cosine, linear, poly, cyclic, onecycle, restarts or plateau",
            ))
        }
    };
    if warmup == 0 {
        return Ok(inner);
    }
    let kind = match warmup_factor {
        // Step s of W runs at (s+1)/(W+1) of the rate (PyTorch's LinearLR with start_factor
        // 1/(W+1), which must be above 0): a ramp from 0 would waste the first step, and with
        // --schedule-unit epoch a whole epoch.
        None => WarmupKind::Linear {
            start_factor: 1.0 / (warmup as f64 + 1.0),
        },
        Some(f) if f > 0.0 && f <= 1.0 => WarmupKind::Constant { factor: f },
        Some(f) => return Err(Error::config("warmup factor", f, "must be in (0, 1]")),
    };
    Ok(Box::new(Warmup {
        kind,
        steps: warmup,
        then: inner,
    }))
}
