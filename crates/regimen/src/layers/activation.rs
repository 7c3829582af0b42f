//! Activation functions (element-wise unless noted). With `s(x) = 1 / (1 + e^-x)`:
//!
//! | layer | `f(x)` | `f'(x)` |
//! |---|---|---|
//! | sigmoid | `s(x)` | `y (1 - y)` |
//! | tanh | `tanh x` | `1 - y^2` |
//! | ReLU | `max(0, x)` | `[x > 0]` |
//! | Leaky ReLU (slope `a`, 0.01 by default; the lecture also shows 0.1) | `max(a x, x)` | `1` or `a` |
//! | ELU (`alpha` = 1) | `x` if `x > 0` else `alpha (e^x - 1)` | `1` or `y + alpha` |
//! | SELU | `lambda ELU_alpha(x)`, `lambda = 1.0507`, `alpha = 1.6733` | `lambda` or `lambda alpha e^x` |
//! | Softplus (`beta` = 1) | `ln(1 + e^{beta x}) / beta` (linear above `beta x > 20`) | `s(beta x)` |
//! | GELU | `x Phi(x)` (exact, erf) | `Phi(x) + x phi(x)` |
//! | Mish | `x tanh(softplus(x))` | `tanh(sp) + x sech^2(sp) s(x)` |
//! | Swish (fixed `beta`; `beta = 1` is SiLU) | `x s(beta x)` | `s + beta x s (1 - s)` |
//!
//! At the kinks (`x = 0`) the derivative used is that of the `x <= 0` side, as PyTorch.
//! [`PReLU`] and [`Swish`] with a learned beta have parameters; [`Softmax`] normalizes over
//! axis 1.

use crate::backend::Unary;
use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, join, keep, Ctx, Layer, Param, ParamKind};
use crate::tensor::{Device, Tensor};

/// A parameter-free element-wise activation.
pub struct Activation {
    op: Unary,
    cache: Option<(Tensor, Tensor)>,
}

impl Activation {
    pub fn new(op: Unary) -> Activation {
        Activation { op, cache: None }
    }
    pub fn op(&self) -> Unary {
        self.op
    }
}

/// The activations by name, as configs and the command line spell them:
/// `sigmoid`, `tanh`, `relu`, `leaky_relu` (slope 0.01) or `leaky_relu:0.1`, `elu` or
/// `elu:ALPHA`, `selu`, `softplus`, `gelu`, `mish`, `swish` / `silu` or `swish:BETA`.
pub fn parse_activation(spec: &str) -> Result<Unary> {
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (spec, None),
    };
    let num = |default: f32| -> Result<f32> {
        match arg {
            None => Ok(default),
            Some(a) => a
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    Error::config(
                        "activation",
                        spec,
                        "the parameter after ':' must be a finite number",
                    )
                }),
        }
    };
    Ok(match name {
        "sigmoid" => Unary::Sigmoid,
        "tanh" => Unary::Tanh,
        "relu" => Unary::Relu,
        "leaky_relu" | "lrelu" => Unary::LeakyRelu(num(0.01)?),
        "elu" => Unary::Elu(num(1.0)?),
        "selu" => Unary::Selu,
        "softplus" => Unary::Softplus { beta: num(1.0)?, threshold: 20.0 },
        "gelu" => Unary::Gelu,
        "mish" => Unary::Mish,
        "swish" | "silu" => Unary::Swish(num(1.0)?),
        _ => return Err(Error::config("activation", spec, "expected sigmoid, tanh, relu, leaky_relu[:slope], elu[:alpha], selu, softplus[:beta], gelu, mish or swish[:beta]")),
    })
}

impl Layer for Activation {
    fn describe(&self) -> String {
        match self.op {
            Unary::LeakyRelu(a) => format!("LeakyReLU({a})"),
            Unary::Elu(a) => format!("ELU({a})"),
            Unary::Softplus { beta, .. } => format!("Softplus({beta})"),
            Unary::Swish(b) => format!("Swish({b})"),
            op => format!("{op:?}"),
        }
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn is_relu(&self) -> bool {
        self.op == Unary::Relu
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let y = x.backend().unary_forward(self.op, x);
        keep(ctx, &mut self.cache, || (x.clone(), y.clone()));
        Ok(y)
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (x, y) = cached(&self.cache, self)?;
        check_dy(self, x.shape(), dy)?;
        Ok(dy.backend().unary_backward(self.op, x, y, dy))
    }
    fn flops(&self, input: &[usize]) -> u64 {
        input.iter().skip(1).product::<usize>() as u64
    }
}

/// PReLU (He et al., 2015): `f(x) = max(0, x) + a min(0, x)` with the slope `a` learned, one
/// per channel (axis 1) or one shared; initialized to 0.25 (PyTorch's default).
/// `da = sum_{x <= 0} dy x`. Parameter name: `weight`.
pub struct PReLU {
    pub a: Param,
    cache: Option<Tensor>,
}

impl PReLU {
    /// `num_parameters` = 1 (shared slope) or the number of channels.
    pub fn new(num_parameters: usize) -> PReLU {
        PReLU {
            a: Param::new(
                Tensor::full(&[num_parameters], 0.25, Device::Cpu),
                ParamKind::Norm,
            ),
            cache: None,
        }
    }
    fn channels_of(&self, input: &[usize]) -> usize {
        if input.len() >= 2 {
            input[1]
        } else {
            1
        }
    }
}

impl Layer for PReLU {
    fn describe(&self) -> String {
        format!("PReLU({})", self.a.value.numel())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let n = self.a.value.numel();
        if input.len() < 2 || (n != 1 && input[1] != n) {
            return Err(Error::shape(
                self.describe(),
                format!("[N, {n}, ...]"),
                input,
            ));
        }
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        keep(ctx, &mut self.cache, || x.clone());
        Ok(x.backend()
            .prelu_forward(x, &self.a.value, self.channels_of(x.shape())))
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let x = cached(&self.cache, self)?;
        check_dy(self, x.shape(), dy)?;
        let c = self.channels_of(x.shape());
        Ok(dy
            .backend()
            .prelu_backward(x, &self.a.value, dy, &mut self.a.grad, c))
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        f(&join(prefix, "weight"), &mut self.a);
    }
    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.a);
    }
    fn flops(&self, input: &[usize]) -> u64 {
        input.iter().skip(1).product::<usize>() as u64
    }
}

/// Swish (Ramachandran et al., 2017) with a learned scalar `beta`: `f(x) = x s(beta x)`,
/// `df/dbeta = x^2 s (1 - s)`. For a fixed beta use `Activation::new(Unary::Swish(beta))`.
/// Parameter name: `beta`.
pub struct Swish {
    pub beta: Param,
    cache: Option<Tensor>,
}

impl Swish {
    pub fn learned(initial_beta: f32) -> Swish {
        Swish {
            beta: Param::new(
                Tensor::full(&[1], initial_beta, Device::Cpu),
                ParamKind::Norm,
            ),
            cache: None,
        }
    }
}

impl Layer for Swish {
    fn describe(&self) -> String {
        "Swish(learned beta)".into()
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        keep(ctx, &mut self.cache, || x.clone());
        Ok(x.backend().swish_forward(x, &self.beta.value))
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let x = cached(&self.cache, self)?;
        check_dy(self, x.shape(), dy)?;
        Ok(dy
            .backend()
            .swish_backward(x, &self.beta.value, dy, &mut self.beta.grad))
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        f(&join(prefix, "beta"), &mut self.beta);
    }
    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.beta);
    }
    fn flops(&self, input: &[usize]) -> u64 {
        4 * input.iter().skip(1).product::<usize>() as u64
    }
}

/// Softmax over axis 1: `y_c = e^{x_c} / sum_k e^{x_k}`; `dx = y (dy - sum_c dy_c y_c)`.
/// For classification prefer the fused [`crate::loss::CrossEntropy`] on logits: it is exact
/// where `log(softmax)` would underflow.
#[derive(Default)]
pub struct Softmax {
    cache: Option<Tensor>,
}

impl Softmax {
    pub fn new() -> Softmax {
        Softmax::default()
    }
}

impl Layer for Softmax {
    fn describe(&self) -> String {
        "Softmax(dim=1)".into()
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() < 2 {
            return Err(Error::shape(self.describe(), "[N, C, ...]", input));
        }
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let y = x.backend().softmax_forward(x, x.shape()[1]);
        keep(ctx, &mut self.cache, || y.clone());
        Ok(y)
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let y = cached(&self.cache, self)?;
        check_dy(self, y.shape(), dy)?;
        Ok(dy.backend().softmax_backward(y, dy, y.shape()[1]))
    }
}
