//! Optimizers: each file writes only its update rule; [`Optim`] does the bookkeeping once —
//! state per parameter, parameter groups, weight decay defaults, gradient clipping, gradient
//! accumulation, and saving/loading the state.
//!
//! ```no_run
//! # use regimen::optim::{Optim, OptimConfig, Adam};
//! # fn demo(model: &mut dyn regimen::Layer) -> regimen::Result<()> {
//! let mut opt = Optim::new(Adam::adamw(), OptimConfig { weight_decay: 0.05, clip_norm: Some(1.0), ..Default::default() })?;
//! // after model.backward(..):
//! opt.step(model, 1e-3)?; // applies the update and zeroes the gradients
//! # Ok(()) }
//! ```

mod adagrad;
mod adam;
mod rmsprop;
mod sgd;

pub use adagrad::Adagrad;
pub use adam::Adam;
pub use rmsprop::RmsProp;
pub use sgd::Sgd;

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::{ParamUpdate, UpdateRule, UpdateScalars};
use crate::error::{Error, Result};
use crate::layer::{Layer, ParamKind};
use crate::tensor::{Device, Indices, Tensor};

/// An optimizer: its hyperparameters, their validation, and its update rule (whose
/// per-element maths the backend runs, see [`crate::backend::UpdateRule`]).
pub trait Optimizer: Send {
    fn name(&self) -> &'static str;
    /// Check the hyperparameters; the error names the field and the bad value.
    fn validate(&self) -> Result<()>;
    fn rule(&self) -> UpdateRule;
}

/// A parameter group: parameters whose name contains `pattern` get their own learning-rate
/// scale and weight decay. The first matching group wins; other parameters use the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    pub pattern: String,
    /// Multiplies the (scheduled) learning rate for these parameters.
    pub lr_scale: f32,
    /// Overrides the weight decay for these parameters.
    pub weight_decay: Option<f32>,
}

/// Settings of [`Optim`] shared by every optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// Weight decay `wd` (L2 added to the gradient, or decoupled for AdamW).
    pub weight_decay: f32,
    /// Decay biases and normalization parameters too. Default false: decaying a bias or a batch
    /// norm scale only hurts (PyTorch decays everything unless given groups).
    pub decay_all: bool,
    pub groups: Vec<ParamGroup>,
    /// Rescale all gradients together when their global L2 norm exceeds this
    /// (`torch.nn.utils.clip_grad_norm_`).
    pub clip_norm: Option<f32>,
    /// Clamp every gradient element to `[-v, v]` (`clip_grad_value_`), before norm clipping.
    pub clip_value: Option<f32>,
    /// Apply the update every `accumulate` calls to [`Optim::step`], on the mean of the
    /// accumulated gradients: an effective batch `accumulate` times larger.
    pub accumulate: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            weight_decay: 0.0,
            decay_all: false,
            groups: Vec::new(),
            clip_norm: None,
            clip_value: None,
            accumulate: 1,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        let nonneg = |field: &str, v: f32| -> Result<()> {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(field, v, "must be a finite number >= 0"))
            }
        };
        nonneg("weight_decay", self.weight_decay)?;
        for g in &self.groups {
            nonneg(&format!("group '{}' lr_scale", g.pattern), g.lr_scale)?;
            if let Some(wd) = g.weight_decay {
                nonneg(&format!("group '{}' weight_decay", g.pattern), wd)?;
            }
        }
        for (field, v) in [
            ("clip_norm", self.clip_norm),
            ("clip_value", self.clip_value),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::config(field, v, "must be a finite number > 0"));
                }
            }
        }
        if self.accumulate == 0 {
            return Err(Error::config("accumulate", 0, "must be at least 1"));
        }
        Ok(())
    }
}

/// What one call to [`Optim::step`] did.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// False while gradients are still being accumulated.
    pub applied: bool,
    /// The global gradient norm before clipping (computed when clipping by norm, or after
    /// [`Optim::measure_grad_norm`]), one
    /// element on the device: read it with `item()` when you need it on the host.
    pub grad_norm: Option<Tensor>,
}

/// Per parameter, in visiting order: what the update needs that does not change between
/// steps (computed once, from the names, when the model's parameters are first seen).
#[derive(Clone, Debug)]
struct Plan {
    names: Vec<String>,
    lr_scale: Vec<f32>,
    weight_decay: Vec<f32>,
}

/// The optimizer bookkeeping: state per parameter name, groups, clipping, accumulation.
///
/// The learning rate and the step count live on the parameters' device, where the update
/// kernel reads them: a step writes the learning rate there (a host-to-device write) and never
/// reads anything back.
pub struct Optim {
    optimizer: Box<dyn Optimizer>,
    rule: UpdateRule,
    cfg: OptimConfig,
    state: BTreeMap<String, Vec<Tensor>>,
    step: u64,
    micro: usize,
    plan: Option<Plan>,
    /// `(learning rate, step counter [1])` on the parameters' device.
    scalars: Option<(Tensor, Indices)>,
    /// The learning rate of every step, when set: uploaded once instead of written per step.
    lr_table: Option<Vec<f32>>,
    /// Compute the gradient norm at the next update even without norm clipping (logging).
    measure_norm: bool,
}

impl Optim {
    pub fn new(optimizer: impl Optimizer + 'static, cfg: OptimConfig) -> Result<Optim> {
        optimizer.validate()?;
        cfg.validate()?;
        Ok(Optim {
            rule: optimizer.rule(),
            optimizer: Box::new(optimizer),
            cfg,
            state: BTreeMap::new(),
            step: 0,
            micro: 0,
            plan: None,
            measure_norm: false,
            scalars: None,
            lr_table: None,
        })
    }

    /// Take the learning rate of update `t` (1-based) from `lrs[min(t - 1, len - 1)]`, a table
    /// uploaded to the device once, instead of the `lr` argument of [`Optim::step`] (which is
    /// then only validated). This is what a step recorded as a CUDA graph needs: the graph
    /// reads the rate from device memory and cannot take a new value from the host.
    pub fn set_lr_table(&mut self, lrs: Vec<f32>) -> Result<()> {
        if lrs.is_empty() {
            return Err(Error::config(
                "lr table",
                "empty",
                "needs at least one rate",
            ));
        }
        if let Some((i, v)) = lrs
            .iter()
            .enumerate()
            .find(|(_, v)| !(**v >= 0.0 && v.is_finite()))
        {
            return Err(Error::config(
                &format!("lr table[{i}]"),
                v,
                "the learning rate must be a finite number >= 0",
            ));
        }
        // The same length on a device that already holds a table: rewrite it in place (a
        // recorded graph keeps reading the same buffer).
        if let (Some(old), Some((lr_t, _))) = (&self.lr_table, &mut self.scalars) {
            if old.len() == lrs.len() {
                lr_t.backend()
                    .write(lr_t, crate::backend::HostBuf::F32(lrs.clone()));
                self.lr_table = Some(lrs);
                return Ok(());
            }
        }
        self.lr_table = Some(lrs);
        self.scalars = None;
        Ok(())
    }

    pub fn name(&self) -> &'static str {
        self.optimizer.name()
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    pub fn rule(&self) -> UpdateRule {
        self.rule
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Count `n` updates that ran as replays of a recorded step (a CUDA graph runs the update
    /// and the device step counter without this host code).
    pub fn count_replayed(&mut self, n: u64) {
        self.step += n;
    }

    /// The step counter on `device` (the key of the random draws of the next forward: it
    /// counts the updates applied so far). Created on first use.
    pub fn step_counter(&mut self, device: Device) -> &Indices {
        &self.device_scalars(device).1
    }

    fn device_scalars(&mut self, device: Device) -> &mut (Tensor, Indices) {
        let stale = !matches!(&self.scalars, Some((lr, _)) if lr.device() == device);
        if stale {
            let step = Indices::from_host(vec![self.step as u32], device);
            let lr = match &self.lr_table {
                Some(t) => {
                    Tensor::from_host(&[t.len()], t.clone(), device).expect("length matches")
                }
                None => Tensor::zeros(&[1], device),
            };
            self.scalars = Some((lr, step));
        }
        self.scalars.as_mut().expect("set above")
    }

    /// `(lr scale, weight decay)` for a parameter.
    fn group_of(&self, name: &str, kind: ParamKind) -> (f32, f32) {
        let default_wd = if self.cfg.decay_all || kind == ParamKind::Weight {
            self.cfg.weight_decay
        } else {
            0.0
        };
        match self.cfg.groups.iter().find(|g| name.contains(&g.pattern)) {
            Some(g) => (g.lr_scale, g.weight_decay.unwrap_or(default_wd)),
            None => (1.0, default_wd),
        }
    }

    /// The plan for `model`'s parameters, made from their names on first sight (or when the
    /// parameter count changes), with their state created and checked.
    fn plan_for(&mut self, model: &mut dyn Layer) -> Result<()> {
        let mut count = 0;
        model.visit_params_unnamed(&mut |_| count += 1);
        if self.plan.as_ref().is_some_and(|p| p.names.len() == count) {
            return Ok(());
        }
        let mut plan = Plan {
            names: Vec::new(),
            lr_scale: Vec::new(),
            weight_decay: Vec::new(),
        };
        let mut error = None;
        let (slots, init) = (self.rule.slots(), self.rule.initial_state());
        let mut found = Vec::new();
        model.visit_params("", &mut |name, p| {
            found.push((
                name.to_string(),
                p.kind,
                p.value.shape().to_vec(),
                p.value.device(),
            ));
        });
        for (name, kind, shape, device) in found {
            let (scale, wd) = self.group_of(&name, kind);
            let entry = self.state.entry(name.clone()).or_insert_with(|| {
                (0..slots)
                    .map(|_| Tensor::full(&shape, init, device))
                    .collect()
            });
            if let Some(bad) = entry.iter().find(|s| s.shape() != shape) {
                error.get_or_insert(Error::shape(
                    format!("optimizer state of {name}"),
                    format!("{:?} (the state's shape)", bad.shape()),
                    &shape,
                ));
            }
            for s in entry.iter_mut() {
                if s.device() != device {
                    *s = s.to_device(device);
                }
            }
            plan.names.push(name);
            plan.lr_scale.push(scale);
            plan.weight_decay.push(wd);
        }
        if let Some(e) = error {
            return Err(e);
        }
        self.plan = Some(plan);
        Ok(())
    }

    /// Compute the global gradient norm at the next update (returned in its [`StepInfo`])
    /// even when gradients are not clipped by norm: a device reduction, for logging.
    pub fn measure_grad_norm(&mut self) {
        self.measure_norm = true;
    }

    /// The backward passes accumulated toward the next update so far (0 to `accumulate - 1`):
    /// the index of the next micro-batch within its update ([`crate::layer::Ctx::at_micro`]).
    pub fn pending_micro(&self) -> usize {
        self.micro
    }

    /// Count one backward pass; every `accumulate`-th call, update the parameters of `model`
    /// with learning rate `lr` and zero the gradients. Nothing is read back from the device.
    pub fn step(&mut self, model: &mut dyn Layer, lr: f32) -> Result<StepInfo> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::config(
                "lr",
                lr,
                "the learning rate must be a finite number >= 0",
            ));
        }
        self.micro += 1;
        if self.micro < self.cfg.accumulate {
            return Ok(StepInfo {
                applied: false,
                grad_norm: None,
            });
        }
        self.plan_for(model)?;
        // Take every value and gradient out of the model (no copy: the storages move), so
        // that one backend call updates them all; put them back after.
        let mut values = Vec::new();
        let mut grads = Vec::new();
        model.visit_params_unnamed(&mut |p| {
            let empty = Tensor::zeros(&[0], p.value.device());
            values.push(std::mem::replace(&mut p.value, empty.clone()));
            grads.push(std::mem::replace(&mut p.grad, empty));
        });
        let Some(device) = values.first().map(Tensor::device) else {
            self.micro = 0;
            self.step += 1;
            return Ok(StepInfo {
                applied: true,
                grad_norm: None,
            });
        };
        let be = device.backend();
        let accumulate = self.cfg.accumulate;
        if accumulate > 1 {
            grads
                .iter_mut()
                .for_each(|g| be.scale(g, 1.0 / accumulate as f32));
        }
        if let Some(v) = self.cfg.clip_value {
            grads.iter_mut().for_each(|g| be.clamp(g, -v, v));
        }
        let clip = self
            .cfg
            .clip_norm
            .map(|max| be.clip_coefficient(&grads.iter().collect::<Vec<_>>(), max));
        // Measured for a log only: the coefficient (1 for an infinite bound) is not applied.
        let measured = (clip.is_none() && std::mem::take(&mut self.measure_norm)).then(|| {
            be.clip_coefficient(&grads.iter().collect::<Vec<_>>(), f32::INFINITY)
                .0
        });
        let plan = self.plan.take().expect("planned above");
        let mut states: Vec<Vec<Tensor>> = plan
            .names
            .iter()
            .map(|n| std::mem::take(self.state.get_mut(n).expect("created by the plan")))
            .collect();
        let table = self.lr_table.is_some();
        let (lr_t, step_t) = self.device_scalars(device);
        if !table {
            be.write(lr_t, crate::backend::HostBuf::F32(vec![lr]));
        }
        be.increment(step_t, 1);
        let mut params: Vec<ParamUpdate<'_>> = values
            .iter_mut()
            .zip(grads.iter_mut())
            .zip(states.iter_mut())
            .enumerate()
            .map(|(i, ((value, grad), state))| ParamUpdate {
                value,
                grad,
                state,
                lr_scale: plan.lr_scale[i],
                weight_decay: plan.weight_decay[i],
            })
            .collect();
        let (lr_t, step_t) = self.scalars.as_ref().expect("set above");
        be.optim_update(
            &self.rule,
            &UpdateScalars {
                lr: lr_t,
                step: step_t,
                grad_scale: clip.as_ref().map(|c| &c.1),
            },
            &mut params,
        );
        drop(params);
        for (name, s) in plan.names.iter().zip(states) {
            *self.state.get_mut(name).expect("created by the plan") = s;
        }
        self.plan = Some(plan);
        let (mut values, mut grads) = (values.into_iter(), grads.into_iter());
        model.visit_params_unnamed(&mut |p| {
            p.value = values.next().expect("same parameters");
            p.grad = grads.next().expect("same parameters");
        });
        self.micro = 0;
        self.step += 1;
        Ok(StepInfo {
            applied: true,
            grad_norm: clip.map(|c| c.0).or(measured),
        })
    }

    /// The whole state as named host tensors (`{param}.{slot}`) and metadata (optimizer,
    /// step, micro-step): what [`Optim::save`] writes and a run state carries.
    pub fn export_state(&self) -> (Vec<crate::io::NamedTensor>, BTreeMap<String, String>) {
        let mut tensors = Vec::new();
        for (name, slots) in &self.state {
            for (k, t) in slots.iter().enumerate() {
                tensors.push((format!("{name}.{k}"), t.shape().to_vec(), t.to_vec()));
            }
        }
        let meta = BTreeMap::from([
            ("optimizer".to_string(), self.name().to_string()),
            ("step".to_string(), self.step.to_string()),
            ("micro".to_string(), self.micro.to_string()),
        ]);
        (tensors, meta)
    }

    /// Restore what [`Optim::export_state`] gave. Everything is checked first (the optimizer
    /// kind, names, slot counts, counters); on an error the optimizer is unchanged. `source`
    /// names where the state came from in errors.
    pub fn import_state(
        &mut self,
        tensors: Vec<crate::io::NamedTensor>,
        meta: &BTreeMap<String, String>,
        source: &str,
    ) -> Result<()> {
        let bad = |reason: String| Error::Data {
            file: source.to_string(),
            reason,
        };
        if meta.get("optimizer").map(String::as_str) != Some(self.name()) {
            return Err(bad(format!(
                "optimizer state of {}, expected {}",
                meta.get("optimizer")
                    .map_or("no named optimizer", String::as_str),
                self.name()
            )));
        }
        let parse = |k: &str| -> Result<u64> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("missing or bad metadata '{k}'")))
        };
        let (step, micro) = (parse("step")?, parse("micro")? as usize);
        if micro >= self.cfg.accumulate {
            return Err(bad(format!(
                "micro-step {micro} is not below accumulate = {}",
                self.cfg.accumulate
            )));
        }
        let mut state: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        let mut entries: Vec<(String, usize, Tensor)> = Vec::new();
        for (key, shape, data) in tensors {
            let (name, k) = key
                .rsplit_once('.')
                .ok_or_else(|| bad(format!("bad tensor name {key}")))?;
            let k: usize = k
                .parse()
                .map_err(|_| bad(format!("bad tensor name {key}")))?;
            let squares = self.rule.nonnegative_slot(k).then_some("it holds squares");
            crate::run_state::check_values(&key, &data, "the file is damaged", squares)
                .map_err(bad)?;
            entries.push((name.to_string(), k, Tensor::from_vec(&shape, data)?));
        }
        entries.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (name, k, t) in entries {
            let slots = state.entry(name.clone()).or_default();
            if slots.len() != k {
                return Err(bad(format!(
                    "state of {name} is missing slot {}",
                    slots.len()
                )));
            }
            slots.push(t);
        }
        if let Some((name, s)) = state.iter().find(|(_, s)| s.len() != self.rule.slots()) {
            return Err(bad(format!(
                "{name} has {} state tensors, {} expected",
                s.len(),
                self.rule.slots()
            )));
        }
        self.state = state;
        self.step = step;
        self.micro = micro;
        self.plan = None;
        self.scalars = None;
        Ok(())
    }

    /// Save the step count and every state tensor to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (tensors, meta) = self.export_state();
        crate::io::write_safetensors(path, &tensors, meta)
    }

    /// Load what [`Optim::save`] wrote. The optimizer kind must match; a failed load changes
    /// nothing.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let (tensors, meta) = crate::io::read_safetensors(path)?;
        self.import_state(tensors, &meta, &path.display().to_string())
    }
}

/// `sqrt(sum over parameters of sum(grad^2))`, read back to the host (a host read: for
/// diagnostics, not for the training step, which clips on the device).
pub fn global_grad_norm(model: &mut dyn Layer) -> f32 {
    let mut grads = Vec::new();
    model.visit_params_unnamed(&mut |p| grads.push(p.grad.clone()));
    match grads.first() {
        None => 0.0,
        Some(g) => g
            .backend()
            .clip_coefficient(&grads.iter().collect::<Vec<_>>(), 1.0)
            .0
            .item(),
    }
}

/// The linear scaling rule (Goyal et al., 2017; the lecture's rule of thumb): when the batch
/// size is multiplied by `N`, multiply the learning rate by `N`:
/// `lr = base_lr * batch / base_batch`.
pub fn scale_lr(base_lr: f32, base_batch: usize, batch: usize) -> f32 {
    base_lr * batch as f32 / base_batch as f32
}
