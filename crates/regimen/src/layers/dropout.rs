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
//! Masks come from the counter-based generator of [`crate::rng`]: element `i` of the mask of
//! the `t`-th training forward depends only on `(seed, t, i)`.

use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, Layer, Mode};
use crate::rng::mix64;
use crate::tensor::Tensor;

pub struct Dropout {
    p: f32,
    seed: u64,
    calls: u64,
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
            seed: 0,
            calls: 0,
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

    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval || self.p == 0.0 {
            self.cache = Some((x.shape().to_vec(), None));
            return Ok(x.clone());
        }
        let seed = mix64(self.seed ^ mix64(self.calls));
        self.calls += 1;
        let (y, mask) = x.backend().dropout_forward(x, self.p, seed);
        self.cache = Some((x.shape().to_vec(), Some(mask)));
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
        self.seed = seed;
        self.calls = 0;
    }
}
