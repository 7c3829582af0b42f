//! A residual block `y = shortcut(x) + branch(x)` (He et al., 2016), with optional
//! stochastic depth (Huang et al., 2016).
//!
//! With stochastic depth probability `p`, training drops the branch of each sample with
//! probability `p`: `y_n = shortcut(x)_n + b_n branch(x)_n`, `b_n ~ Bernoulli(1 - p)`
//! (per sample; torchvision's `mode="row"`). Evaluation keeps every branch scaled by its
//! survival probability: `y = shortcut(x) + (1 - p) branch(x)`, the expectation over `b`, as in
//! the paper. The shortcut is the identity unless given (e.g. a 1x1 convolution that changes
//! the channel count). A ReLU after the sum, as in ResNet, is the next layer of the model.
//! Parameter names: `branch.*`, `shortcut.*`.

use crate::backend::RandomKey;
use crate::error::{Error, Result};
use crate::layer::{cached, join, keep, Ctx, Layer, Mode, Param};
use crate::rng::{mix64, purpose};
use crate::tensor::{DType, Tensor};

pub struct Residual {
    branch: Box<dyn Layer>,
    shortcut: Option<Box<dyn Layer>>,
    drop_prob: f32,
    stream: u64,
    /// How the branch was scaled in the last forward: per-sample factors, or one constant.
    cache: Option<(Vec<usize>, Scale)>,
}

enum Scale {
    Rows(Tensor),
    Constant(f32),
}

impl Residual {
    pub fn new(branch: impl Layer + 'static) -> Residual {
        Residual {
            branch: Box::new(branch),
            shortcut: None,
            drop_prob: 0.0,
            stream: 0,
            cache: None,
        }
    }

    pub fn with_shortcut(mut self, shortcut: impl Layer + 'static) -> Residual {
        self.shortcut = Some(Box::new(shortcut));
        self
    }

    /// Drop the branch with probability `p` in training, in `[0, 1)`.
    pub fn stochastic_depth(mut self, p: f32) -> Result<Residual> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(
                "stochastic depth p",
                p,
                "the drop probability must be in [0, 1)",
            ));
        }
        self.drop_prob = p;
        Ok(self)
    }
}

impl Layer for Residual {
    fn describe(&self) -> String {
        if self.drop_prob > 0.0 {
            format!("Residual(stochastic depth p={})", self.drop_prob)
        } else {
            "Residual".into()
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let b = self
            .branch
            .output_shape(input)
            .map_err(|e| e.in_layer("branch"))?;
        let s = match &self.shortcut {
            Some(s) => s.output_shape(input).map_err(|e| e.in_layer("shortcut"))?,
            None => input.to_vec(),
        };
        if b != s {
            return Err(Error::shape(
                self.describe(),
                format!("an input whose branch output {b:?} matches the shortcut output"),
                &s,
            ));
        }
        Ok(b)
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let be = x.backend();
        let b = self
            .branch
            .forward(x, ctx)
            .map_err(|e| e.in_layer("branch"))?;
        let s = match &mut self.shortcut {
            Some(l) => l.forward(x, ctx).map_err(|e| e.in_layer("shortcut"))?,
            None => x.clone(),
        };
        // The sum is f32: a branch or shortcut that is a bare layer (a 1x1 convolution, say)
        // hands on bf16 under bf16 activations.
        let (b, s) = (b.to_dtype(DType::F32), s.to_dtype(DType::F32));
        let scale = match ctx.mode {
            Mode::Train if self.drop_prob > 0.0 => {
                // Sample n keeps its branch when u(stream, step, STOCHASTIC_DEPTH, n) >= p.
                let step = ctx.step_on(x.device());
                let key = RandomKey {
                    stream: ctx.stream(self.stream),
                    step: &step,
                    purpose: purpose::STOCHASTIC_DEPTH,
                };
                Scale::Rows(be.bernoulli_keep(&[x.shape()[0]], self.drop_prob, key))
            }
            Mode::Eval => Scale::Constant(1.0 - self.drop_prob),
            Mode::Train => Scale::Constant(1.0),
        };
        let y = match &scale {
            Scale::Rows(k) => be.add(&s, &be.scale_rows(&b, k)),
            Scale::Constant(c) if *c == 1.0 => be.add(&s, &b),
            Scale::Constant(c) => {
                let mut y = s.clone();
                be.axpy(*c, &b, &mut y);
                y
            }
        };
        keep(ctx, &mut self.cache, || (y.shape().to_vec(), scale));
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (ys, scale) = cached(&self.cache, self)?;
        crate::layer::check_dy(self, ys, dy)?;
        let be = dy.backend();
        let db = match scale {
            Scale::Rows(k) => be.scale_rows(dy, k),
            Scale::Constant(c) if *c == 1.0 => dy.clone(),
            Scale::Constant(c) => {
                let mut g = dy.clone();
                be.scale(&mut g, *c);
                g
            }
        };
        let dx_branch = self
            .branch
            .backward(&db)
            .map_err(|e| e.in_layer("branch"))?;
        let dx_short = match &mut self.shortcut {
            Some(l) => l.backward(dy).map_err(|e| e.in_layer("shortcut"))?,
            None => dy.clone(),
        };
        Ok(be.add(&dx_branch, &dx_short))
    }

    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        self.branch.visit_params(&join(prefix, "branch"), f);
        if let Some(s) = &mut self.shortcut {
            s.visit_params(&join(prefix, "shortcut"), f);
        }
    }

    fn visit_buffers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.branch.visit_buffers(&join(prefix, "branch"), f);
        if let Some(s) = &mut self.shortcut {
            s.visit_buffers(&join(prefix, "shortcut"), f);
        }
    }

    fn flops(&self, input: &[usize]) -> u64 {
        let out: usize = self
            .output_shape(input)
            .map(|s| s.iter().skip(1).product())
            .unwrap_or(0);
        self.branch.flops(input) + self.shortcut.as_ref().map_or(0, |s| s.flops(input)) + out as u64
    }

    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.branch.visit_params_unnamed(f);
        if let Some(s) = &mut self.shortcut {
            s.visit_params_unnamed(f);
        }
    }

    fn sync_batch_norm(&mut self, on: bool) {
        self.branch.sync_batch_norm(on);
        if let Some(s) = &mut self.shortcut {
            s.sync_batch_norm(on);
        }
    }

    fn reseed(&mut self, seed: u64) {
        self.stream = seed;
        self.branch.reseed(mix64(seed ^ 1));
        if let Some(s) = &mut self.shortcut {
            s.reseed(mix64(seed ^ 2));
        }
    }

    fn children(&self) -> Vec<(String, &dyn Layer)> {
        let mut c = vec![("branch".to_string(), self.branch.as_ref())];
        if let Some(s) = &self.shortcut {
            c.push(("shortcut".to_string(), s.as_ref()));
        }
        c
    }
}
