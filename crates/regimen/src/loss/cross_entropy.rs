//! Softmax cross-entropy, fused with its gradient.
//!
//! For logits `z` of one row, `p = softmax(z)` and a target distribution `t` (one-hot for a
//! hard label; any distribution for Mixup/CutMix soft labels):
//!
//! ```text
//! loss = -sum_c t_c log p_c = logsumexp(z) sum_c t_c - sum_c t_c z_c
//! dloss/dz = p sum_c t_c - t          (= p - t for a distribution)
//! ```
//!
//! averaged over the `N` rows. Label smoothing `eps` (Szegedy et al., 2016) replaces `t` by
//! `(1 - eps) t + eps / C`. Computing from logits through log-sum-exp is exact where
//! `log(softmax(z))` would underflow. PyTorch: `F.cross_entropy(z, target,
//! label_smoothing=eps)` with class indices or class probabilities.

use crate::backend::Target;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A loss value (one element, on the device) and the gradient with respect to the input.
#[derive(Clone, Debug)]
pub struct LossOutput {
    pub loss: Tensor,
    pub grad: Tensor,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropy {
    pub label_smoothing: f32,
}

impl CrossEntropy {
    pub fn new() -> CrossEntropy {
        CrossEntropy::default()
    }

    pub fn with_label_smoothing(eps: f32) -> Result<CrossEntropy> {
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::config("label_smoothing", eps, "must be in [0, 1]"));
        }
        Ok(CrossEntropy {
            label_smoothing: eps,
        })
    }

    /// The mean loss over the batch and `d loss / d logits`.
    pub fn forward(&self, logits: &Tensor, target: Target<'_>) -> Result<LossOutput> {
        let s = logits.shape();
        if s.len() != 2 || s[0] == 0 || s[1] == 0 {
            return Err(Error::shape("CrossEntropy", "logits [N, C]", s));
        }
        let (n, c) = (s[0], s[1]);
        match target {
            Target::Hard(labels) => {
                if labels.len() != n {
                    return Err(Error::shape(
                        "CrossEntropy",
                        format!("{n} labels for logits {s:?}"),
                        &[labels.len()],
                    ));
                }
                // Labels are validated where they are made (a dataset checks its labels when it
                // is loaded); their bound says so without reading the device.
                if labels.bound() > c as u64 {
                    return Err(Error::config(
                        "labels",
                        format!("up to {}", labels.bound() - 1),
                        &format!("class index must be below the {c} classes of the logits"),
                    ));
                }
            }
            Target::Soft(t) => {
                if t.shape() != s {
                    return Err(Error::shape(
                        "CrossEntropy",
                        format!("soft targets of the logits' shape {s:?}"),
                        t.shape(),
                    ));
                }
            }
        }
        let (loss, grad) =
            logits
                .backend()
                .softmax_cross_entropy(logits, target, self.label_smoothing, 1.0);
        Ok(LossOutput { loss, grad })
    }
}
