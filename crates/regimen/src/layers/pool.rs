//! Pooling layers: max, average and global average pooling over `[N, C, H, W]`.
//!
//! - `MaxPool2d`: `y = max` over each `k x k` window (stride defaults to `k`; padding acts as
//!   -inf). Backward routes `dy` to the arg-max of each window (the first one on ties).
//! - `AvgPool2d`: `y = (1 / k^2) sum` over each window, padding counted as zeros
//!   (PyTorch's `count_include_pad = True`).
//! - `GlobalAvgPool`: `y[n, c] = mean_{h, w} x[n, c, h, w]`, output `[N, C]` (PyTorch's
//!   `AdaptiveAvgPool2d(1)` followed by `Flatten`).

use crate::backend::Window;
use crate::error::{Error, Result};
use crate::layer::{cached, check_dy, keep, Ctx, Layer};
use crate::tensor::{Indices, Tensor};

fn pooled_shape(name: String, win: Window, input: &[usize]) -> Result<Vec<usize>> {
    let bad = || {
        Error::shape(
            name.clone(),
            format!(
                "[N, C, H >= {}, W >= {}] (after padding {})",
                win.kh, win.kw, win.pad
            ),
            input,
        )
    };
    if input.len() != 4
        || win.kh == 0
        || win.kw == 0
        || win.stride == 0
        || win.pad * 2 > win.kh.max(win.kw)
    {
        return Err(bad());
    }
    Ok(vec![
        input[0],
        input[1],
        win.out_len(input[2], win.kh).ok_or_else(bad)?,
        win.out_len(input[3], win.kw).ok_or_else(bad)?,
    ])
}

pub struct MaxPool2d {
    win: Window,
    cache: Option<(Vec<usize>, Vec<usize>, Indices)>,
}

impl MaxPool2d {
    pub fn new(kernel: usize) -> MaxPool2d {
        MaxPool2d {
            win: Window {
                kh: kernel,
                kw: kernel,
                stride: kernel,
                pad: 0,
            },
            cache: None,
        }
    }
    pub fn stride(mut self, stride: usize) -> Self {
        self.win.stride = stride;
        self
    }
    pub fn padding(mut self, pad: usize) -> Self {
        self.win.pad = pad;
        self
    }
}

impl Layer for MaxPool2d {
    fn describe(&self) -> String {
        format!(
            "MaxPool2d(k{}, s{}, p{})",
            self.win.kh, self.win.stride, self.win.pad
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        pooled_shape(self.describe(), self.win, input)
    }
    fn is_max_pool_2x2(&self) -> bool {
        self.win
            == Window {
                kh: 2,
                kw: 2,
                stride: 2,
                pad: 0,
            }
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        let (y, idx) = x.backend().max_pool2d_forward(x, self.win);
        keep(ctx, &mut self.cache, || {
            (x.shape().to_vec(), y.shape().to_vec(), idx)
        });
        Ok(y)
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let (xs, ys, idx) = cached(&self.cache, self)?;
        check_dy(self, ys, dy)?;
        Ok(dy
            .backend()
            .max_backward(dy, idx, xs, ys[2] * ys[3], xs[2] * xs[3]))
    }
    fn flops(&self, input: &[usize]) -> u64 {
        self.output_shape(input)
            .map(|o| (o[1] * o[2] * o[3] * self.win.kh * self.win.kw) as u64)
            .unwrap_or(0)
    }
}

pub struct AvgPool2d {
    win: Window,
    x_shape: Option<Vec<usize>>,
}

impl AvgPool2d {
    pub fn new(kernel: usize) -> AvgPool2d {
        AvgPool2d {
            win: Window {
                kh: kernel,
                kw: kernel,
                stride: kernel,
                pad: 0,
            },
            x_shape: None,
        }
    }
    pub fn stride(mut self, stride: usize) -> Self {
        self.win.stride = stride;
        self
    }
    pub fn padding(mut self, pad: usize) -> Self {
        self.win.pad = pad;
        self
    }
}

impl Layer for AvgPool2d {
    fn describe(&self) -> String {
        format!(
            "AvgPool2d(k{}, s{}, p{})",
            self.win.kh, self.win.stride, self.win.pad
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        pooled_shape(self.describe(), self.win, input)
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        keep(ctx, &mut self.x_shape, || x.shape().to_vec());
        Ok(x.backend().avg_pool2d_forward(x, self.win))
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let xs = cached(&self.x_shape, self)?;
        check_dy(self, &self.output_shape(xs)?, dy)?;
        Ok(dy.backend().avg_pool2d_backward(dy, xs, self.win))
    }
    fn flops(&self, input: &[usize]) -> u64 {
        self.output_shape(input)
            .map(|o| (o[1] * o[2] * o[3] * self.win.kh * self.win.kw) as u64)
            .unwrap_or(0)
    }
}

#[derive(Default)]
pub struct GlobalAvgPool {
    x_shape: Option<Vec<usize>>,
}

impl GlobalAvgPool {
    pub fn new() -> GlobalAvgPool {
        GlobalAvgPool::default()
    }
}

impl Layer for GlobalAvgPool {
    fn describe(&self) -> String {
        "GlobalAvgPool".into()
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() < 3 {
            return Err(Error::shape(
                self.describe(),
                "[N, C, H, W] or [N, C, L]",
                input,
            ));
        }
        Ok(vec![input[0], input[1]])
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.output_shape(x.shape())?;
        keep(ctx, &mut self.x_shape, || x.shape().to_vec());
        Ok(x.backend().global_avg_pool_forward(x, x.shape()[1]))
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let xs = cached(&self.x_shape, self)?;
        check_dy(self, &[xs[0], xs[1]], dy)?;
        Ok(dy.backend().global_avg_pool_backward(dy, xs))
    }
    fn flops(&self, input: &[usize]) -> u64 {
        input.iter().skip(1).product::<usize>() as u64
    }
}
