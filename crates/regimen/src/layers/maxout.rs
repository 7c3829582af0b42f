//! Maxout (Goodfellow et al., 2013): `y_j = max_{i < k} (w_{j,i}^T x + b_{j,i})`.
//!
//! The lecture's `max(w1^T x + b1, w2^T x + b2)` is `k = 2`. It generalizes ReLU
//! (`w2 = 0, b2 = 0`) and Leaky ReLU, never saturates and never dies, at the price of `k`
//! times the parameters. Implemented as a `Linear(in -> out k)` whose output row is read as
//! `out` groups of `k` consecutive pieces (PyTorch equivalent:
//! `linear(x).view(N, out, k).max(-1).values`). Parameters `linear.weight` `[out k, in]`,
//! `linear.bias`.

use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, join, keep, Ctx, Layer, Param};
use crate::layers::Linear;
use crate::rng::Rng;
use crate::tensor::{Indices, Tensor};

pub struct Maxout {
    pub linear: Linear,
    pieces: usize,
    cache: Option<(Vec<usize>, Indices)>,
}

impl Maxout {
    pub fn new(
        in_features: usize,
        out_features: usize,
        pieces: usize,
        rng: &mut Rng,
    ) -> Result<Maxout> {
        if pieces == 0 {
            return Err(Error::config(
                "maxout pieces",
                pieces,
                "need at least one linear piece",
            ));
        }
        Ok(Maxout {
            linear: Linear::new(in_features, out_features * pieces, rng),
            pieces,
            cache: None,
        })
    }

    fn out_features(&self) -> usize {
        self.linear.out_features() / self.pieces
    }
}

impl Layer for Maxout {
    fn describe(&self) -> String {
        format!(
            "Maxout({} -> {}, k={})",
            self.linear.in_features(),
            self.out_features(),
            self.pieces
        )
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 2 || input[1] != self.linear.in_features() {
            return Err(Error::shape(
                self.describe(),
                format!("[N, {}]", self.linear.in_features()),
                input,
            ));
        }
        Ok(vec![input[0], self.out_features()])
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let z = self.linear.forward(x, ctx)?;
        let (y, idx) = z.backend().max_groups_forward(&z, self.pieces);
        keep(ctx, &mut self.cache, || (z.shape().to_vec(), idx));
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (zs, idx) = cached(&self.cache, self)?;
        check_dy(self, &[zs[0], self.out_features()], dy)?;
        let dz = dy.backend().max_backward(dy, idx, zs, dy.shape()[1], zs[1]);
        self.linear.backward(&dz)
    }

    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        self.linear.visit_params(&join(prefix, "linear"), f);
    }

    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.linear.visit_params_unnamed(f);
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.linear.set_input_grad(needed);
    }

    fn flops(&self, input: &[usize]) -> u64 {
        self.linear.flops(input) + self.linear.out_features() as u64
    }
}
