//! Mean squared error: `loss = 1/M sum_i (p_i - t_i)^2` over all `M` elements,
//! `dloss/dp = 2 (p - t) / M`. PyTorch: `F.mse_loss(p, t)`.

use super::LossOutput;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, Default)]
pub struct Mse;

impl Mse {
    pub fn forward(&self, pred: &Tensor, target: &Tensor) -> Result<LossOutput> {
        if pred.shape() != target.shape() {
            return Err(Error::shape(
                "MSE",
                format!("target of the prediction's shape {:?}", pred.shape()),
                target.shape(),
            ));
        }
        let (loss, grad) = pred.backend().mse(pred, target, 1.0);
        Ok(LossOutput { loss, grad })
    }
}
