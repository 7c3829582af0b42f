//! Exact run state: everything a training run needs to continue where it stopped.
//!
//! A [`RunState`] holds the model's parameters and buffers (under their own names, `0.weight`,
//! so that the file loads into the PyTorch model as it is), the optimizer's
//! state tensors (`optim.{name}.{slot}`) with its step and micro-step counters (and, in the
//! middle of an accumulated update, the gradients summed so far: `grad.{name}`), the state the
//! schedule learned from the metrics it observed (reduce-on-plateau), the run's seed and the
//! number of epochs completed. Everything random in a step is a pure function of the seed, the
//! optimizer's step counter and the position in the model ([`crate::rng`]), and the loader's
//! order is a pure function of the seed and the epoch, so restoring these values and
//! continuing with `first_epoch = epochs_done + 1` ([`crate::train::FitConfig`]) gives bit for
//! bit the run that was never interrupted (`tests/engine.rs` checks it).
//!
//! It saves to one safetensors file (atomically, see [`crate::io::write_safetensors`]), and
//! [`RunState::restore`] checks everything (names, shapes, the optimizer kind, the counters, the
//! schedule state) before it changes anything: a failed restore leaves the model, the optimizer
//! and the schedule as they were.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{read_safetensors, write_safetensors, NamedTensor};
use crate::layer::Layer;
use crate::optim::Optim;
use crate::schedule::Schedule;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub struct RunState {
    pub tensors: Vec<NamedTensor>,
    pub meta: BTreeMap<String, String>,
}

/// Where a restored run continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub seed: u64,
    pub epochs_done: usize,
}

impl RunState {
    /// The state of a run after `epochs_done` epochs (a host read of every tensor).
    pub fn capture(
        model: &mut dyn Layer,
        optim: &Optim,
        schedule: &dyn Schedule,
        seed: u64,
        epochs_done: usize,
    ) -> RunState {
        let mut tensors = Vec::new();
        model.visit_params("", &mut |name, p| {
            tensors.push((name.to_string(), p.value.shape().to_vec(), p.value.to_vec()))
        });
        model.visit_buffers("", &mut |name, b| {
            tensors.push((name.to_string(), b.shape().to_vec(), b.to_vec()))
        });
        // In the middle of an accumulated update the gradients hold the micro-batches so far.
        if optim.pending_micro() > 0 {
            model.visit_params("", &mut |name, p| {
                tensors.push((
                    format!("grad.{name}"),
                    p.grad.shape().to_vec(),
                    p.grad.to_vec(),
                ))
            });
        }
        let (opt_tensors, opt_meta) = optim.export_state();
        tensors.extend(
            opt_tensors
                .into_iter()
                .map(|(n, s, v)| (format!("optim.{n}"), s, v)),
        );
        let mut meta: BTreeMap<String, String> = opt_meta
            .into_iter()
            .map(|(k, v)| (format!("optim.{k}"), v))
            .collect();
        meta.insert("regimen".into(), "run-state".into());
        meta.insert("seed".into(), seed.to_string());
        meta.insert("epochs_done".into(), epochs_done.to_string());
        // Rust prints f64 in the shortest form that reads back to the same bits.
        let st: Vec<String> = schedule.state().iter().map(|v| v.to_string()).collect();
        meta.insert("schedule_state".into(), st.join(","));
        RunState { tensors, meta }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_safetensors(path, &self.tensors, self.meta.clone())
    }

    pub fn load(path: &Path) -> Result<RunState> {
        let (tensors, meta) = read_safetensors(path)?;
        if meta.get("regimen").map(String::as_str) != Some("run-state") {
            return Err(Error::Data {
                file: path.display().to_string(),
                reason: "not a regimen run state (no 'regimen = run-state' metadata)".into(),
            });
        }
        Ok(RunState { tensors, meta })
    }

    /// Put the state back into `model`, `optim` and `schedule`; returns where to continue.
    /// `source` names the state in errors (a file name). Nothing changes on an error.
    pub fn restore(
        &self,
        model: &mut dyn Layer,
        optim: &mut Optim,
        schedule: &mut dyn Schedule,
        source: &str,
    ) -> Result<Position> {
        let bad = |reason: String| Error::Data {
            file: source.to_string(),
            reason,
        };
        let num = |k: &str| -> Result<u64> {
            self.meta
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("missing or bad metadata '{k}'")))
        };
        let position = Position {
            seed: num("seed")?,
            epochs_done: num("epochs_done")? as usize,
        };
        let schedule_state: Vec<f64> = match self.meta.get("schedule_state").map(String::as_str) {
            None | Some("") => Vec::new(),
            Some(s) => s
                .split(',')
                .map(|v| v.parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(format!("bad schedule_state {s:?}")))?,
        };
        // The model's tensors (every name outside `optim.` and `preprocess.`), checked against
        // the state (nothing changes yet).
        let by_name: BTreeMap<&str, (&Vec<usize>, &Vec<f32>)> = self
            .tensors
            .iter()
            .filter(|(n, _, _)| {
                !n.starts_with("optim.") && !n.starts_with("preprocess.") && !n.starts_with("grad.")
            })
            .map(|(n, s, v)| (n.as_str(), (s, v)))
            .collect();
        let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
        model.visit_params("", &mut |n, p| {
            wanted.push((n.to_string(), p.value.shape().to_vec()))
        });
        model.visit_buffers("", &mut |n, b| {
            wanted.push((n.to_string(), b.shape().to_vec()))
        });
        for (name, shape) in &wanted {
            match by_name.get(name.as_str()) {
                None => return Err(bad(format!("no tensor {name} for this model"))),
                Some((s, _)) if *s != shape => {
                    return Err(bad(format!(
                        "{name} has shape {s:?}, the model expects {shape:?}"
                    )))
                }
                Some((_, v)) => {
                    check_values(name, v, "the file is damaged", nonnegative_buffer(name))
                        .map_err(bad)?
                }
            }
        }
        if by_name.len() != wanted.len() {
            let known: Vec<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
            let extra = by_name
                .keys()
                .find(|n| !known.contains(n))
                .copied()
                .unwrap_or("?");
            return Err(bad(format!("tensor {extra} is not in this model")));
        }
        // Accumulated gradients, when the state has them: one per parameter, of its shape.
        let grads: BTreeMap<&str, (&Vec<usize>, &Vec<f32>)> = self
            .tensors
            .iter()
            .filter_map(|(n, s, v)| n.strip_prefix("grad.").map(|n| (n, (s, v))))
            .collect();
        if !grads.is_empty() {
            let mut params: Vec<(String, Vec<usize>)> = Vec::new();
            model.visit_params("", &mut |n, p| {
                params.push((n.to_string(), p.value.shape().to_vec()))
            });
            for (name, shape) in &params {
                match grads.get(name.as_str()) {
                    Some((s, v)) if *s == shape => {
                        check_values(&format!("grad.{name}"), v, "the file is damaged", None)
                            .map_err(bad)?
                    }
                    Some((s, _)) => {
                        return Err(bad(format!(
                            "grad.{name} has shape {s:?}, the parameter {shape:?}"
                        )))
                    }
                    None => return Err(bad(format!("no grad.{name} with the other gradients"))),
                }
            }
            if grads.len() != params.len() {
                return Err(bad(
                    "a grad.* tensor names no parameter of this model".into()
                ));
            }
        }
        // The schedule and the optimizer check their own parts; roll the schedule back if the
        // optimizer refuses.
        let old_schedule = schedule.state();
        schedule.set_state(&schedule_state)?;
        let opt_tensors: Vec<NamedTensor> = self
            .tensors
            .iter()
            .filter_map(|(n, s, v)| {
                n.strip_prefix("optim.")
                    .map(|n| (n.to_string(), s.clone(), v.clone()))
            })
            .collect();
        let opt_meta: BTreeMap<String, String> = self
            .meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("optim.").map(|k| (k.to_string(), v.clone())))
            .collect();
        if let Err(e) = optim.import_state(opt_tensors, &opt_meta, source) {
            schedule.set_state(&old_schedule)?;
            return Err(e);
        }
        // Everything fits: the model changes last.
        let put = |name: &str, t: &mut Tensor| {
            let (shape, values) = by_name[name];
            *t = Tensor::from_host(shape, values.clone(), t.device()).expect("checked above");
        };
        model.visit_params("", &mut |n, p| put(n, &mut p.value));
        model.visit_buffers("", &mut |n, b| put(n, b));
        model.visit_params("", &mut |n, p| {
            if let Some((shape, values)) = grads.get(n) {
                p.grad = Tensor::from_host(shape, (*values).clone(), p.grad.device())
                    .expect("checked above");
            }
        });
        Ok(position)
    }
}

/// A saved tensor's values: all finite (else `{name}[i] is v ({nonfinite})`), and, when
/// `negative` says why they cannot be, none below zero (`{name}[i] is v, but {negative} (the
/// file is damaged)`). Run states, checkpoints and optimizer states all check with it: a
/// damaged state would otherwise make a resumed run "diverge" for no reason of its own.
pub(crate) fn check_values(
    name: &str,
    v: &[f32],
    nonfinite: &str,
    negative: Option<&str>,
) -> std::result::Result<(), String> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("{name}[{i}] is {} ({nonfinite})", v[i]));
    }
    if let Some(why) = negative {
        if let Some(i) = v.iter().position(|&x| x < 0.0) {
            return Err(format!(
                "{name}[{i}] is {}, but {why} (the file is damaged)",
                v[i]
            ));
        }
    }
    Ok(())
}

/// Why a tensor named `name` cannot hold a negative value, if it cannot (a batch norm's
/// running variance).
pub(crate) fn nonnegative_buffer(name: &str) -> Option<&'static str> {
    name.ends_with("running_var")
        .then_some("a variance cannot be negative")
}
