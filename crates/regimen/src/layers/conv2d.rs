//! 2-D convolution (cross-correlation, as every framework).
//!
//! `y[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] x[n, c, i s + p - pad, j s + q - pad]`;
//! `x: [N, C, H, W]`, `W: [OC, C, KH, KW]`, `y: [N, OC, OH, OW]` with
//! `OH = floor((H + 2 pad - KH) / s) + 1`. PyTorch's `nn.Conv2d` (groups = 1, dilation = 1),
//! same parameter names and default initialization.

use crate::backend::Window;
use crate::error::{Error, Result};
use crate::init::Init;
use crate::layer::{cached, check_dy, join, keep, Ctx, Layer, Param, ParamKind};
use crate::rng::Rng;
use crate::tensor::Tensor;

pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub stride: usize,
    pub padding: usize,
    x: Option<Tensor>,
    input_grad: bool,
}

impl Conv2d {
    /// A `kernel x kernel` convolution with stride 1, no padding, and a bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, rng: &mut Rng) -> Conv2d {
        let shape = [out_channels, in_channels, kernel, kernel];
        let fan_in = in_channels * kernel * kernel;
        let weight = Param::new(Init::PyTorchDefault.sample(&shape, rng), ParamKind::Weight);
        let bias = Init::PyTorchDefault.sample_with_fan(&[out_channels], fan_in, out_channels, rng);
        Conv2d {
            weight,
            bias: Some(Param::new(bias, ParamKind::Bias)),
            stride: 1,
            padding: 0,
            x: None,
            input_grad: true,
        }
    }

    pub fn stride(mut self, stride: usize) -> Conv2d {
        self.stride = stride;
        self
    }

    pub fn padding(mut self, padding: usize) -> Conv2d {
        self.padding = padding;
        self
    }

    pub fn without_bias(mut self) -> Conv2d {
        self.bias = None;
        self
    }

    /// Re-initialize the weight with `init` and the bias with zeros.
    pub fn with_init(mut self, init: Init, rng: &mut Rng) -> Conv2d {
        let shape = self.weight.value.shape().to_vec();
        self.weight = Param::new(init.sample(&shape, rng), ParamKind::Weight);
        if let Some(b) = &mut self.bias {
            b.value.backend().fill(&mut b.value, 0.0);
        }
        self
    }

    fn window(&self) -> Window {
        let s = self.weight.value.shape();
        Window {
            kh: s[2],
            kw: s[3],
            stride: self.stride,
            pad: self.padding,
        }
    }
}

impl Layer for Conv2d {
    fn describe(&self) -> String {
        let s = self.weight.value.shape();
        format!(
            "Conv2d({} -> {}, k{}x{}, s{}, p{})",
            s[1], s[0], s[2], s[3], self.stride, self.padding
        )
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let s = self.weight.value.shape();
        let win = self.window();
        let bad = || {
            Error::shape(
                self.describe(),
                format!(
                    "[N, {}, H >= {}, W >= {}] (after padding {})",
                    s[1], s[2], s[3], self.padding
                ),
                input,
            )
        };
        if input.len() != 4 || input[1] != s[1] || self.stride == 0 || s[2] == 0 || s[3] == 0 {
            return Err(bad());
        }
        let oh = win.out_len(input[2], s[2]).ok_or_else(bad)?;
        let ow = win.out_len(input[3], s[3]).ok_or_else(bad)?;
        Ok(vec![input[0], s[0], oh, ow])
    }

    /// (Its products round the input to 16 bits anyway under mixed precision; under bf16
    /// activations its output is bf16 too.)
    fn takes_half(&self) -> bool {
        true
    }

    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        // Mixed precision: input and weight rounded to the product type, f32 out.
        let dtype = ctx.precision.dtype();
        let xq = x.to_dtype(dtype);
        let y = x.backend().conv2d_forward(
            &xq,
            &self.weight.value.to_dtype(dtype),
            self.bias.as_ref().map(|b| &b.value),
            self.window(),
        );
        keep(ctx, &mut self.x, || xq);
        // bf16 activations: the output rounded once, as the next product would round it
        // (batch norm normalizes it from there and keeps it in bf16).
        Ok(y.to_dtype(ctx.precision.activations()))
    }

    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let x = cached(&self.x, self)?;
        check_dy(self, &self.output_shape(x.shape())?, dy)?;
        let win = self.window();
        Ok(dy.backend().conv2d_backward(
            x,
            &self.weight.value.to_dtype(x.dtype()),
            dy,
            win,
            &mut self.weight.grad,
            self.bias.as_mut().map(|b| &mut b.grad),
            self.input_grad,
        ))
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

    fn flops(&self, input: &[usize]) -> u64 {
        let Ok(out) = self.output_shape(input) else {
            return 0;
        };
        let s = self.weight.value.shape();
        let per_out = 2 * s[1] * s[2] * s[3] + usize::from(self.bias.is_some());
        (per_out * out[1] * out[2] * out[3]) as u64
    }
}
