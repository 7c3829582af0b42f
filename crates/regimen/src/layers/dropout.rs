//! Dropout (Srivastava et al., 2014), inverted.
//!
//! Training: each element is zeroed with probability `p` and the survivors are scaled by
//! `1 / (1 - p)`: `y = x * m / (1 - p)`, `m ~ Bernoulli(1 - p)`. Evaluation: `y = x`.
//!
//! This is the lecture's rule in another place. The lecture keeps training as `y = x * m` and
//! at test time "multiplies by the dropout probability" (the keep probability `1 - p`), so that
//! the test-time output equals the training-time expectation `E[x m] = (1 - p) x`. Inverted
//! dropout divides by `1 - p` during training instead: then `E[y] = x` already, and test time
//! needs no scaling. The two networks differ only by the constant factor `1 - p` on that layer's
//! output, which the next layer's weights absorb: they compute the same family of functions.
//!
//! Masks come from the counter-based generator of [`crate::rng`]: element `i` of the mask at
//! training step `t` depends only on `(stream, t, DROPOUT, i)`, where the stream is the layer's
//! key (its position in the model under the run's seed), and is the same on every device.

use crate::backend::RandomKey;
use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, keep, Ctx, Layer, Mode};
use crate::rng::purpose;
use crate::tensor::Tensor;

pub struct Dropout {
    p: f32,
    stream: u64,
    /// `None` after an eval forward (identity), `Some(mask)` after a training one.
    cache: Option<(Vec<usize>, Option<Tensor>)>,
}

impl Dropout {
    /// `p` is the probability of dropping an element, in `[0, 1)`.
    pub fn new(p: f32) -> Result<Dropout> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(
                "dropout p",
                p,
                "the drop probability must be in [0, 1)",
            ));
        }
        Ok(Dropout {
            p,
            stream: 0,
            cache: None,
        })
    }

    pub fn p(&self) -> f32 {
        self.p
    }
}

impl Layer for Dropout {
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }

    /// (bf16 activations: dropped and scaled in f32, handed on in bf16; the mask is f32.)
    fn takes_half(&self) -> bool {
        true
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if ctx.mode == Mode::Eval || self.p == 0.0 {
            keep(ctx, &mut self.cache, || (x.shape().to_vec(), None));
            return Ok(x.clone());
        }
        let step = ctx.step_on(x.device());
        let key = RandomKey {
            stream: ctx.stream(self.stream),
            step: &step,
            purpose: purpose::DROPOUT,
        };
        let (y, mask) = x.backend().dropout_forward(x, self.p, key);
        keep(ctx, &mut self.cache, || (x.shape().to_vec(), Some(mask)));
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (shape, mask) = cached(&self.cache, self)?;
        check_dy(self, shape, dy)?;
        Ok(match mask {
            Some(m) => dy.backend().mul(dy, m),
            None => dy.clone(),
        })
    }

    fn reseed(&mut self, seed: u64) {
        self.stream = seed;
    }

    fn as_dropout(&self) -> Option<(f32, u64)> {
        Some((self.p, self.stream))
    }
}
