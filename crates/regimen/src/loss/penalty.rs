//! Weight penalties added to the loss: `L(W) = data loss + lambda R(W)` (the lecture's
//! regularization), with
//!
//! | penalty | `R(W)` | `dR/dW` |
//! |---|---|---|
//! | L2 | `sum W^2` | `2 W` |
//! | L1 | `sum |W|` | `sign(W)` (0 at 0) |
//! | elastic net | `sum beta W^2 + |W|` | `2 beta W + sign(W)` |
//!
//! The penalty's gradient is added to the parameter gradients, as if it were part of the
//! loss. (Decoupled weight decay, which shrinks weights in the optimizer step instead, is the
//! optimizer's business.) By default only weights are penalized, not biases or normalization
//! parameters.

use crate::error::{Error, Result};
use crate::layer::{Layer, ParamKind};
use crate::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Penalty {
    L2 { lambda: f32 },
    L1 { lambda: f32 },
    ElasticNet { lambda: f32, beta: f32 },
}

impl Penalty {
    pub fn validate(&self) -> Result<()> {
        let (lambda, beta) = match *self {
            Penalty::L2 { lambda } | Penalty::L1 { lambda } => (lambda, 0.0),
            Penalty::ElasticNet { lambda, beta } => (lambda, beta),
        };
        if !(lambda >= 0.0 && lambda.is_finite()) {
            return Err(Error::config(
                "penalty lambda",
                lambda,
                "must be a finite number >= 0",
            ));
        }
        if !(beta >= 0.0 && beta.is_finite()) {
            return Err(Error::config(
                "elastic net beta",
                beta,
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }

    /// `lambda R(w)` as a one-element tensor.
    pub fn value(&self, w: &Tensor) -> Tensor {
        let be = w.backend();
        let (mut v, lambda) = match *self {
            Penalty::L2 { lambda } => (be.sum_sq(w), lambda),
            Penalty::L1 { lambda } => (be.sum_abs(w), lambda),
            Penalty::ElasticNet { lambda, beta } => {
                let mut s = be.sum_abs(w);
                be.axpy(beta, &be.sum_sq(w), &mut s);
                (s, lambda)
            }
        };
        be.scale(&mut v, lambda);
        v
    }

    /// `g += lambda dR/dw`.
    pub fn add_grad(&self, w: &Tensor, g: &mut Tensor) {
        let be = w.backend();
        match *self {
            Penalty::L2 { lambda } => be.axpy(2.0 * lambda, w, g),
            Penalty::L1 { lambda } => be.add_sign(lambda, w, g),
            Penalty::ElasticNet { lambda, beta } => {
                be.axpy(2.0 * lambda * beta, w, g);
                be.add_sign(lambda, w, g);
            }
        }
    }

    /// Add the penalty's gradient to every weight of `model` (not biases or normalization
    /// parameters) and return the total penalty (one element, on the model's device).
    pub fn apply(&self, model: &mut dyn Layer) -> Tensor {
        self.apply_to(model, |_, kind| kind == ParamKind::Weight)
    }

    /// The same on the parameters `chosen(name, kind)` selects (e.g. only `fc` layers).
    pub fn apply_to(
        &self,
        model: &mut dyn Layer,
        chosen: impl Fn(&str, ParamKind) -> bool,
    ) -> Tensor {
        let mut total: Option<Tensor> = None;
        model.visit_params("", &mut |name, p| {
            if !chosen(name, p.kind) {
                return;
            }
            let v = self.value(&p.value);
            self.add_grad(&p.value, &mut p.grad);
            total = Some(match total.take() {
                None => v,
                Some(t) => t.backend().add(&t, &v),
            });
        });
        total.unwrap_or_else(|| Tensor::zeros(&[1], Device::Cpu))
    }
}

/// Parse `l1:LAMBDA`, `l2:LAMBDA` or `elastic:LAMBDA:BETA` (the command line's `--penalty`).
pub fn parse_penalty(spec: &str) -> Result<Penalty> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |s: &str, field: &str| -> Result<f32> {
        s.parse()
            .map_err(|_| Error::config(field, s, "is not a number"))
    };
    let p = match parts.as_slice() {
        ["l1", l] => Penalty::L1 {
            lambda: num(l, "penalty lambda")?,
        },
        ["l2", l] => Penalty::L2 {
            lambda: num(l, "penalty lambda")?,
        },
        ["elastic", l, b] => Penalty::ElasticNet {
            lambda: num(l, "penalty lambda")?,
            beta: num(b, "elastic net beta")?,
        },
        _ => {
            return Err(Error::config(
                "penalty",
                spec,
                "expected l1:LAMBDA, l2:LAMBDA or elastic:LAMBDA:BETA",
            ))
        }
    };
    p.validate()?;
    Ok(p)
}
