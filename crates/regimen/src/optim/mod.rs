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

pub(crate) use adagrad::update as adagrad_update;
pub(crate) use adam::update as adam_update;
pub(crate) use rmsprop::update as rmsprop_update;
pub(crate) use sgd::update as sgd_update;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::layer::{Layer, ParamKind};
use crate::tensor::Tensor;

/// An update rule, as data: what a backend needs to run it over a whole parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateRule {
    Sgd(Sgd),
    Adagrad(Adagrad),
    RmsProp(RmsProp),
    Adam(Adam),
}

/// An optimizer: its hyperparameters, their validation, and its update rule.
pub trait Optimizer: Send {
    fn name(&self) -> &'static str;
    /// Check the hyperparameters; the error names the field and the bad value.
    fn validate(&self) -> Result<()>;
    /// Number of state tensors per parameter (each the parameter's shape).
    fn slots(&self) -> usize;
    /// The initial value of the state (Adagrad's `initial_accumulator_value`).
    fn initial_state(&self) -> f32 {
        0.0
    }
    /// True when weight decay is applied by the rule itself (AdamW) rather than added to the
    /// gradient as `wd theta` (L2).
    fn decoupled_decay(&self) -> bool {
        false
    }
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// False while gradients are still being accumulated.
    pub applied: bool,
    /// The global gradient norm before clipping (computed only when clipping by norm).
    pub grad_norm: Option<f32>,
}

/// The optimizer bookkeeping: state per parameter name, groups, clipping, accumulation.
pub struct Optim {
    optimizer: Box<dyn Optimizer>,
    cfg: OptimConfig,
    state: BTreeMap<String, Vec<Tensor>>,
    step: u64,
    micro: usize,
}

impl Optim {
    pub fn new(optimizer: impl Optimizer + 'static, cfg: OptimConfig) -> Result<Optim> {
        optimizer.validate()?;
        cfg.validate()?;
        Ok(Optim {
            optimizer: Box::new(optimizer),
            cfg,
            state: BTreeMap::new(),
            step: 0,
            micro: 0,
        })
    }

    pub fn name(&self) -> &'static str {
        self.optimizer.name()
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
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

    /// Count one backward pass; every `accumulate`-th call, update the parameters of `model`
    /// with learning rate `lr` and zero the gradients.
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
        self.micro = 0;
        self.step += 1;
        let accumulate = self.cfg.accumulate;
        if accumulate > 1 {
            model.visit_params("", &mut |_, p| {
                p.grad.backend().scale(&mut p.grad, 1.0 / accumulate as f32)
            });
        }
        if let Some(v) = self.cfg.clip_value {
            model.visit_params("", &mut |_, p| p.grad.backend().clamp(&mut p.grad, -v, v));
        }
        let grad_norm = match self.cfg.clip_norm {
            Some(max) => {
                let norm = global_grad_norm(model);
                // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1.
                let coef = max / (norm + 1e-6);
                if coef < 1.0 {
                    model.visit_params("", &mut |_, p| p.grad.backend().scale(&mut p.grad, coef));
                }
                Some(norm)
            }
            None => None,
        };
        let rule = self.optimizer.rule();
        let slots = self.optimizer.slots();
        let init = self.optimizer.initial_state();
        let step = self.step;
        let mut error = None;
        let groups: Vec<(String, f32, f32)> = {
            let mut v = Vec::new();
            model.visit_params("", &mut |name, p| {
                let (s, wd) = self.group_of(name, p.kind);
                v.push((name.to_string(), s, wd));
            });
            v
        };
        let state = &mut self.state;
        let mut i = 0;
        model.visit_params("", &mut |name, p| {
            let (_, scale, wd) = &groups[i];
            i += 1;
            let entry = state.entry(name.to_string()).or_insert_with(|| {
                (0..slots)
                    .map(|_| Tensor::full(p.value.shape(), init, p.value.device()))
                    .collect()
            });
            if entry.iter().any(|s| s.shape() != p.value.shape()) {
                error.get_or_insert(Error::shape(
                    format!("optimizer state of {name}"),
                    format!("{:?} (the state's shape)", entry[0].shape()),
                    p.value.shape(),
                ));
                return;
            }
            p.value.backend().optim_update(
                rule,
                step,
                lr * scale,
                *wd,
                &mut p.value,
                &p.grad,
                entry,
            );
            p.zero_grad();
        });
        match error {
            Some(e) => Err(e),
            None => Ok(StepInfo {
                applied: true,
                grad_norm,
            }),
        }
    }

    /// Save the step count and every state tensor to a safetensors file (atomically: written
    /// to a temporary file, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (name, slots) in &self.state {
            for (k, t) in slots.iter().enumerate() {
                tensors.push((format!("{name}.{k}"), t.shape().to_vec(), t.to_vec()));
            }
        }
        let meta = HashMap::from([
            ("optimizer".to_string(), self.name().to_string()),
            ("step".to_string(), self.step.to_string()),
            ("micro".to_string(), self.micro.to_string()),
        ]);
        crate::io::write_safetensors(path, &tensors, meta)
    }

    /// Load what [`Optim::save`] wrote. The optimizer kind must match.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let (tensors, meta) = crate::io::read_safetensors(path)?;
        let file = path.display().to_string();
        let bad = |reason: String| Error::Data {
            file: file.clone(),
            reason,
        };
        if meta.get("optimizer").map(String::as_str) != Some(self.name()) {
            return Err(bad(format!(
                "optimizer state of {:?}, expected {}",
                meta.get("optimizer"),
                self.name()
            )));
        }
        let parse = |k: &str| -> Result<u64> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("missing or bad metadata '{k}'")))
        };
        let (step, micro) = (parse("step")?, parse("micro")? as usize);
        let mut state: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        let mut entries: Vec<(String, usize, Tensor)> = Vec::new();
        for (key, shape, data) in tensors {
            let (name, k) = key
                .rsplit_once('.')
                .ok_or_else(|| bad(format!("bad tensor name {key}")))?;
            let k: usize = k
                .parse()
                .map_err(|_| bad(format!("bad tensor name {key}")))?;
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
        if let Some((name, s)) = state
            .iter()
            .find(|(_, s)| s.len() != self.optimizer.slots())
        {
            return Err(bad(format!(
                "{name} has {} state tensors, {} expected",
                s.len(),
                self.optimizer.slots()
            )));
        }
        self.state = state;
        self.step = step;
        self.micro = micro;
        Ok(())
    }
}

/// `sqrt(sum over parameters of sum(grad^2))` (one value read back to the host).
pub fn global_grad_norm(model: &mut dyn Layer) -> f32 {
    let mut total = 0.0f64;
    model.visit_params("", &mut |_, p| {
        total += p.grad.backend().sum_sq(&p.grad).item() as f64
    });
    total.sqrt() as f32
}

/// The linear scaling rule (Goyal et al., 2017; the lecture's rule of thumb): when the batch
/// size is multiplied by `N`, multiply the learning rate by `N`:
/// `lr = base_lr * batch / base_batch`.
pub fn scale_lr(base_lr: f32, base_batch: usize, batch: usize) -> f32 {
    base_lr * batch as f32 / base_batch as f32
}
