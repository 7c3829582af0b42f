//! `[N, d1, d2, ...] -> [N, d1 d2 ...]` (no copy). Backward reshapes back.

use crate::error::{Error, Result};
use crate::layer::{cached, keep, Ctx, Layer};
use crate::tensor::Tensor;

#[derive(Default)]
pub struct Flatten {
    x_shape: Option<Vec<usize>>,
}

impl Flatten {
    pub fn new() -> Flatten {
        Flatten::default()
    }
}

impl Layer for Flatten {
    fn describe(&self) -> String {
        "Flatten".into()
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.is_empty() {
            return Err(Error::shape(self.describe(), "[N, ...]", input));
        }
        Ok(vec![input[0], input[1..].iter().product()])
    }
    /// (A reshape: any element type.)
    fn takes_half(&self) -> bool {
        true
    }
    fn forward(&mut self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let out = self.output_shape(x.shape())?;
        keep(ctx, &mut self.x_shape, || x.shape().to_vec());
        x.reshape(&out)
    }
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let xs = cached(&self.x_shape, self)?;
        dy.reshape(xs).map_err(|_| {
            Error::shape(
                "Flatten backward",
                format!("{:?}", self.output_shape(xs).unwrap_or_default()),
                dy.shape(),
            )
        })
    }
}
