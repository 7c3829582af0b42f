//! Fully connected layer.
//!
//! `y = x W^T + b`; `x: [N, in]`, `W: [out, in]`, `b: [out]`, `y: [N, out]` (PyTorch's
//! `nn.Linear`, same parameter names `weight` and `bias`).
//! Backward (the lecture's "W*X gate"): `dW += dy^T x`, `db += sum_n dy`, `dx = dy W`.
//! Default initialization is PyTorch's (`U(-1/sqrt(in), 1/sqrt(in))` for weight and bias);
//! see [`Linear::with_init`].

use crate::backend::RandomKey;
use crate::error::{Error, Result};
use crate::init::{fans, Init};
use crate::layer::{cached, check_dy, join, keep, Ctx, Layer, Mode, Param, ParamKind};
use crate::rng::{purpose, Rng};
use crate::tensor::{DType, Tensor};

pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    x: Option<Tensor>,
    /// After [`Layer::forward_relu`] (or [`Layer::forward_relu_dropout`]): the ReLU's (the
    /// dropout's) output, from which backward, then given that output's gradient, finds where
    /// the ReLU passed (a dropped element is 0 and passes no gradient either), and the scale
    /// of the elements a fused dropout kept, `1 / (1 - p)` (1 without one).
    relu_out: Option<(Tensor, f32)>,
    input_grad: bool,
}

impl Linear {
    pub fn new(in_features: usize, out_features: usize, rng: &mut Rng) -> Linear {
        let shape = [out_features, in_features];
        let weight = Param::new(Init::PyTorchDefault.sample(&shape, rng), ParamKind::Weight);
        let bias =
            Init::PyTorchDefault.sample_with_fan(&[out_features], in_features, out_features, rng);
        Linear {
            weight,
            bias: Some(Param::new(bias, ParamKind::Bias)),
            x: None,
            relu_out: None,
            input_grad: true,
        }
    }

    /// Drop the bias (e.g. before a batch norm, which has its own shift).
    pub fn without_bias(mut self) -> Linear {
        self.bias = None;
        self
    }

    /// Re-initialize the weight with `init` and the bias with zeros.
    pub fn with_init(mut self, init: Init, rng: &mut Rng) -> Linear {
        let shape = self.weight.value.shape().to_vec();
        self.weight = Param::new(init.sample(&shape, rng), ParamKind::Weight);
        if let Some(b) = &mut self.bias {
            b.value.backend().fill(&mut b.value, 0.0);
        }
        self
    }

    pub fn in_features(&self) -> usize {
        self.weight.value.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.value.shape()[0]
    }

    /// Forward, then a ReLU, then (with `dropout`: its drop probability and the dropout
    /// layer's stream) a dropout as that layer draws it, in one pass over the output.
    fn fused_forward(
        &mut self,
        x: &Tensor,
        ctx: &Ctx,
        dropout: Option<(f32, u64)>,
    ) -> Result<Tensor> {
        self.relu_out = None;
        let mut y = self.product(x, ctx)?;
        let be = x.backend();
        let bias = self.bias.as_ref().map(|b| &b.value);
        let out = self.out_features();
        let scale = match dropout {
            // (Evaluation, or p = 0: the dropout is the identity.)
            Some((p, stream)) if ctx.mode == Mode::Train && p > 0.0 => {
                let step = ctx.step_on(x.device());
                let key = RandomKey {
                    stream: ctx.stream(stream),
                    step: &step,
                    purpose: purpose::DROPOUT,
                };
                be.bias_relu_dropout(&mut y, bias, out, p, key);
                1.0 / (1.0 - p)
            }
            _ => {
                be.bias_relu(&mut y, bias, out);
                1.0
            }
        };
        // bf16 activations: the output, and what backward keeps of it, rounded once after
        // the ReLU and dropout (the next product would round it there anyway: the same
        // values as the layers one by one). A plain forward's output stays f32.
        let y = y.to_dtype(ctx.precision.activations());
        keep(ctx, &mut self.relu_out, || (y.clone(), scale));
        Ok(y)
    }

    /// `x W^T` (the bias not yet added), keeping the input for backward.
    fn product(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let shape = self.output_shape(x.shape())?;
        let be = x.backend();
        // Mixed precision: input and weight rounded to the product type, f32 out.
        let dtype = ctx.precision.dtype();
        let xq = x.to_dtype(dtype);
        let mut y = be.alloc(&shape, DType::F32);
        be.matmul(
            &xq,
            false,
            &self.weight.value.to_dtype(dtype),
            true,
            &mut y,
            false,
        );
        keep(ctx, &mut self.x, || xq);
        Ok(y)
    }
}

impl Layer for Linear {
    fn describe(&self) -> String {
        format!("Linear({} -> {})", self.in_features(), self.out_features())
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() != 2 || input[1] != self.in_features() {
            return Err(Error::shape(
                self.describe(),
                format!("[N, {}]", self.in_features()),
                input,
            ));
        }
        Ok(vec![input[0], self.out_features()])
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.relu_out = None;
        let mut y = self.product(x, ctx)?;
        if let Some(b) = &self.bias {
            x.backend()
                .add_channel_bias(&mut y, &b.value, self.out_features());
        }
        Ok(y)
    }

    /// (Its products round the input to 16 bits anyway under mixed precision.)
    fn takes_half(&self) -> bool {
        true
    }

    /// The sum and the ReLU in one pass over the output (`Backend::bias_relu`), in place.
    fn forward_relu(&mut self, x: &Tensor, ctx: &Ctx) -> Option<Result<Tensor>> {
        Some(self.fused_forward(x, ctx, None))
    }

    /// The sum, the ReLU and the dropout in one pass (`Backend::bias_relu_dropout`), drawing
    /// the dropout layer's masks.
    fn forward_relu_dropout(
        &mut self,
        x: &Tensor,
        ctx: &Ctx,
        p: f32,
        stream: u64,
    ) -> Option<Result<Tensor>> {
        Some(self.fused_forward(x, ctx, Some((p, stream))))
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let x = cached(&self.x, self)?;
        check_dy(self, &[x.shape()[0], self.out_features()], dy)?;
        let be = dy.backend();
        let out = self.out_features();
        let dz;
        let dy = match &self.relu_out {
            // `dy` is the ReLU's (dropout's) output gradient: the mask and the bias's sums in
            // one pass.
            Some((y, scale)) => {
                let db = self.bias.as_mut().map(|b| &mut b.grad);
                dz = be.bias_relu_backward(y, dy, db, out, *scale);
                &dz
            }
            None => {
                if let Some(b) = &mut self.bias {
                    be.channel_bias_backward(dy, &mut b.grad, out);
                }
                dy
            }
        };
        // Under mixed precision `x` is the rounded input and dy is rounded to match.
        let dyq = dy.to_dtype(x.dtype());
        be.matmul(&dyq, true, x, false, &mut self.weight.grad, true);
        if !self.input_grad {
            return Ok(Tensor::zeros(&[0], x.device()));
        }
        let mut dx = be.alloc(x.shape(), DType::F32);
        be.matmul(
            &dyq,
            false,
            &self.weight.value.to_dtype(x.dtype()),
            false,
            &mut dx,
            false,
        );
        Ok(dx)
    }

    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        f(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            f(&join(prefix, "bias"), b);
        }
    }

    fn visit_params_unnamed(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }

    fn flops(&self, _input: &[usize]) -> u64 {
        let (fi, fo) = fans(self.weight.value.shape());
        (2 * fi * fo + if self.bias.is_some() { fo } else { 0 }) as u64
    }
}
