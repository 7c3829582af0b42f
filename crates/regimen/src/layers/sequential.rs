//! `Sequential`: layers applied in order; backward runs them in reverse.
//!
//! Children are named `0`, `1`, ... (or by [`Sequential::push_named`]) and parameters get
//! PyTorch-style paths: `3.weight`, `features.0.bias`. Errors from a child are prefixed with
//! its path, so a bad shape says which layer refused it.
//!
//! A forward hook ([`Sequential::set_hook`]) sees each child's output: the point where the
//! per-layer activation statistics of the lecture's initialization experiment are taken.

use std::fmt;

use crate::error::Result;
use crate::layer::{join, param_count, Ctx, ForwardHook, Layer, Param};
use crate::rng::mix64;
use crate::tensor::{DType, Tensor};

#[derive(Default)]
pub struct Sequential {
    layers: Vec<(String, Box<dyn Layer>)>,
    hook: Option<ForwardHook>,
    seed: u64,
    /// Set by `set_input_grad(false)`: the index of the first layer with parameters.
    stop_at: Option<usize>,
    /// The layers that a layer before them applied in the last forward (ReLUs, by
    /// [`Layer::forward_relu`]; ReLUs and the 2x2 max pools after them, by
    /// [`Layer::forward_relu_pool`]; ReLUs and the dropouts after them, by
    /// [`Layer::forward_relu_dropout`]); backward passes the gradient through them untouched.
    fused: Vec<bool>,
    /// Whether to fuse at all ([`Sequential::set_fusion`]).
    no_fusion: bool,
}

impl Sequential {
    pub fn new() -> Sequential {
        Sequential::default()
    }

    /// Append a layer named by its position.
    pub fn push(self, layer: impl Layer + 'static) -> Sequential {
        let name = self.layers.len().to_string();
        self.push_named(&name, layer)
    }

    /// Append a layer with a name (its parameters are then `name.weight`, ...).
    pub fn push_named(mut self, name: &str, layer: impl Layer + 'static) -> Sequential {
        self.push_boxed(name, Box::new(layer));
        self
    }

    pub fn push_boxed(&mut self, name: &str, mut layer: Box<dyn Layer>) {
        // Each position gets its own random stream, so two dropout layers never share masks.
        layer.reseed(mix64(self.seed ^ mix64(self.layers.len() as u64 + 1)));
        self.layers.push((name.to_string(), layer));
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Whether a layer followed by a ReLU (and a 2x2 max pool) may apply them in its own passes
    /// (batch norm in training does: passes over memory fewer forward and backward, and
    /// neither the ReLU's output nor the pool's arg-max positions stored; a linear layer
    /// adds its bias and applies the ReLU, and a dropout after it, in one pass). On by
    /// default; the results are the same bits either way, but for non-finite values at
    /// elements a dropout dropped (`Backend::bias_relu_backward`). A forward hook turns it
    /// off, since it must see every child's own output, and so does `REGIMEN_FUSION=0` for
    /// every `Sequential` of the process.
    pub fn set_fusion(&mut self, on: bool) {
        self.no_fusion = !on;
    }

    /// The layers (by position: ReLUs, and 2x2 max pools after them) that a layer before them
    /// applied in the last forward.
    pub fn fused_layers(&self) -> Vec<usize> {
        (0..self.fused.len()).filter(|&i| self.fused[i]).collect()
    }

    /// Call `hook(name, output)` after each child's forward (replaces any previous hook).
    pub fn set_hook(&mut self, hook: ForwardHook) {
        self.hook = Some(hook);
    }

    pub fn clear_hook(&mut self) {
        self.hook = None;
    }

    /// The layer whose backward is the last one run (the first layer with parameters, when the
    /// input's gradient is not needed: see `set_input_grad`), or `None` when every layer runs.
    pub fn backward_stops_at(&self) -> Option<usize> {
        self.stop_at
    }

    pub fn layers_mut(&mut self) -> impl Iterator<Item = (&str, &mut Box<dyn Layer>)> {
        self.layers.iter_mut().map(|(n, l)| (n.as_str(), l))
    }

    /// A table of every child: output shape (per sample), parameters, forward FLOPs per sample.
    /// `input` is the shape of one sample, without the batch axis.
    pub fn summary(&mut self, input: &[usize]) -> Result<Summary> {
        let mut shape: Vec<usize> = std::iter::once(1).chain(input.iter().copied()).collect();
        let mut rows = Vec::new();
        for (name, layer) in &mut self.layers {
            let flops = layer.flops(&shape);
            shape = layer.output_shape(&shape).map_err(|e| e.in_layer(name))?;
            rows.push(SummaryRow {
                name: name.clone(),
                layer: layer.describe(),
                output: shape[1..].to_vec(),
                params: param_count(layer.as_mut()),
                flops,
            });
        }
        Ok(Summary {
            input: input.to_vec(),
            rows,
        })
    }
}

/// `REGIMEN_FUSION=0`: no `Sequential` fuses (the same results), to measure what fusion gains.
fn fusion_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("REGIMEN_FUSION").is_ok_and(|v| v == "0"))
}

impl Layer for Sequential {
    fn describe(&self) -> String {
        format!("Sequential({} layers)", self.layers.len())
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let mut shape = input.to_vec();
        for (name, layer) in &self.layers {
            shape = layer.output_shape(&shape).map_err(|e| e.in_layer(name))?;
        }
        Ok(shape)
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut h = x.clone();
        let fuse = !self.no_fusion && self.hook.is_none() && !fusion_off();
        self.fused.clear();
        self.fused.resize(self.layers.len(), false);
        let mut i = 0;
        while i < self.layers.len() {
            // A 16-bit activation (bf16 mixed precision) goes as it is only to a layer that
            // takes one; `f32` to any other.
            if h.dtype() != DType::F32 && !self.layers[i].1.takes_half() {
                h = h.to_dtype(DType::F32);
            }
            let relu_next = self.layers.get(i + 1).is_some_and(|(_, l)| l.is_relu());
            if fuse
                && relu_next
                && self
                    .layers
                    .get(i + 2)
                    .is_some_and(|(_, l)| l.is_max_pool_2x2())
            {
                let (name, layer) = &mut self.layers[i];
                if let Some(y) = layer.forward_relu_pool(&h, ctx) {
                    h = y.map_err(|e| e.in_layer(name))?;
                    self.fused[i + 1] = true;
                    self.fused[i + 2] = true;
                    i += 3;
                    continue;
                }
            }
            let dropout_after = self.layers.get(i + 2).and_then(|(_, l)| l.as_dropout());
            if let (true, true, Some((p, stream))) = (fuse, relu_next, dropout_after) {
                let (name, layer) = &mut self.layers[i];
                if let Some(y) = layer.forward_relu_dropout(&h, ctx, p, stream) {
                    h = y.map_err(|e| e.in_layer(name))?;
                    self.fused[i + 1] = true;
                    self.fused[i + 2] = true;
                    i += 3;
                    continue;
                }
            }
            if fuse && relu_next {
                let (name, layer) = &mut self.layers[i];
                if let Some(y) = layer.forward_relu(&h, ctx) {
                    h = y.map_err(|e| e.in_layer(name))?;
                    self.fused[i + 1] = true;
                    i += 2;
                    continue;
                }
            }
            let (name, layer) = &mut self.layers[i];
            h = layer.forward(&h, ctx).map_err(|e| e.in_layer(name))?;
            if let Some(hook) = &mut self.hook {
                hook(name, &h);
            }
            i += 1;
        }
        // What a Sequential hands on is `f32` (the loss, metrics and callers read that).
        Ok(h.to_dtype(DType::F32))
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let mut g = dy.clone();
        for (i, (name, layer)) in self.layers.iter_mut().enumerate().rev() {
            if !self.fused.get(i).copied().unwrap_or(false) {
                g = layer.backward(&g).map_err(|e| e.in_layer(name))?;
            }
            if self.stop_at == Some(i) {
                return Ok(Tensor::zeros(&[0], dy.device()));
            }
        }
        Ok(g)
    }

    fn backward_in_parts(
        &mut self,
        dy: &Tensor,
        ready: &mut dyn FnMut(&mut dyn Layer),
    ) -> Option<Result<Tensor>> {
        let mut g = dy.clone();
        for (i, (name, layer)) in self.layers.iter_mut().enumerate().rev() {
            if !self.fused.get(i).copied().unwrap_or(false) {
                g = match layer.backward(&g).map_err(|e| e.in_layer(name)) {
                    Ok(g) => g,
                    Err(e) => return Some(Err(e)),
                };
            }
            ready(layer.as_mut());
            if self.stop_at == Some(i) {
                return Some(Ok(Tensor::zeros(&[0], dy.device())));
            }
        }
        Some(Ok(g))
    }

    fn sync_batch_norm(&mut self, on: bool) {
        for (_, layer) in &mut self.layers {
            layer.sync_batch_norm(on);
        }
    }

    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        for (name, layer) in &mut self.layers {
            layer.visit_params(&join(prefix, name), f);
        }
    }

    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for (_, layer) in &mut self.layers {
            layer.visit_params_unnamed(f);
        }
    }

    fn visit_buffers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (name, layer) in &mut self.layers {
            layer.visit_buffers(&join(prefix, name), f);
        }
    }

    fn flops(&self, input: &[usize]) -> u64 {
        let mut shape = input.to_vec();
        let mut total = 0;
        for (_, layer) in &self.layers {
            total += layer.flops(&shape);
            match layer.output_shape(&shape) {
                Ok(s) => shape = s,
                Err(_) => return total,
            }
        }
        total
    }

    /// Without an input gradient, backward stops at the first layer that has parameters
    /// (the layers before it have nothing to learn) and returns an empty tensor.
    fn set_input_grad(&mut self, needed: bool) {
        for (_, layer) in &mut self.layers {
            layer.set_input_grad(true);
        }
        self.stop_at = None;
        if !needed {
            if let Some(i) = self
                .layers
                .iter_mut()
                .position(|(_, l)| param_count(l.as_mut()) > 0)
            {
                self.layers[i].1.set_input_grad(false);
                self.stop_at = Some(i);
            }
        }
    }

    fn reseed(&mut self, seed: u64) {
        self.seed = seed;
        for (i, (_, layer)) in self.layers.iter_mut().enumerate() {
            layer.reseed(mix64(seed ^ mix64(i as u64 + 1)));
        }
    }

    fn children(&self) -> Vec<(String, &dyn Layer)> {
        self.layers
            .iter()
            .map(|(n, l)| (n.clone(), l.as_ref() as &dyn Layer))
            .collect()
    }
}

/// One line of a model summary.
#[derive(Clone, Debug)]
pub struct SummaryRow {
    pub name: String,
    pub layer: String,
    pub output: Vec<usize>,
    pub params: usize,
    pub flops: u64,
}

/// A model summary; `Display` prints it as a table.
#[derive(Clone, Debug)]
pub struct Summary {
    pub input: Vec<usize>,
    pub rows: Vec<SummaryRow>,
}

impl Summary {
    pub fn total_params(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }
    pub fn total_flops(&self) -> u64 {
        self.rows.iter().map(|r| r.flops).sum()
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<6} {:<36} {:<16} {:>10} {:>12}",
            "name", "layer", "output", "params", "FLOPs"
        )?;
        writeln!(
            f,
            "{:<6} {:<36} {:<16} {:>10} {:>12}",
            "",
            "input",
            format!("{:?}", self.input),
            "",
            ""
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<6} {:<36} {:<16} {:>10} {:>12}",
                r.name,
                r.layer,
                format!("{:?}", r.output),
                r.params,
                human(r.flops)
            )?;
        }
        write!(
            f,
            "total: {} parameters, {} FLOPs per sample (forward)",
            self.total_params(),
            human(self.total_flops())
        )
    }
}
