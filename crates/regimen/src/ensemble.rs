//! Ensembles: several models (or snapshots of one run) predict together by averaging their
//! predicted class probabilities, then taking the arg-max (the lecture's "train multiple
//! independent models, at test time average their results"; Huang et al.'s snapshot
//! ensembles average the snapshots of one run the same way).
//!
//! Each member keeps its own preprocessing: the raw images are preprocessed per member with
//! the statistics it was trained with, so members trained with different preprocessing can be
//! combined.

use crate::data::{Dataset, Preprocessor};
use crate::error::{Error, Result};
use crate::layer::{Ctx, Layer};
use crate::tensor::Device;

/// One model of an ensemble.
pub struct Member {
    /// How reports name it (a checkpoint path).
    pub name: String,
    pub model: Box<dyn Layer>,
    pub preprocess: Option<Preprocessor>,
}

/// Each member's figures and the ensemble's.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `(name, loss, accuracy)` per member.
    pub members: Vec<(String, f32, f32)>,
    /// Mean negative log of the averaged probability of the true class.
    pub loss: f32,
    pub accuracy: f32,
    pub samples: usize,
}

/// Softmax probabilities `[N, classes]` of `model` on `data` (evaluation mode).
pub fn probabilities(
    model: &mut dyn Layer,
    data: &Dataset,
    batch_size: usize,
    device: Device,
) -> Result<Vec<f32>> {
    let k = data.num_classes();
    let mut out = Vec::with_capacity(data.len() * k);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, _) = data.batch(chunk, device)?;
        let logits = model.forward(&x, &Ctx::eval())?;
        let classes = logits.shape()[1];
        let v = logits.to_vec();
        for row in v.chunks(classes) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&z| ((z - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            out.extend(e.iter().map(|&p| (p / s) as f32));
        }
    }
    Ok(out)
}

/// `(loss, accuracy)` of probabilities `[N, classes]` against `labels`. The arg-max takes the
/// first class on ties.
pub fn score(probs: &[f32], labels: &[u32], classes: usize) -> (f32, f32) {
    let (mut loss, mut correct) = (0f64, 0usize);
    for (row, &y) in probs.chunks(classes).zip(labels) {
        let mut best = 0;
        for c in 1..classes {
            if row[c] > row[best] {
                best = c;
            }
        }
        correct += (best == y as usize) as usize;
        loss -= (row[y as usize] as f64).max(1e-30).ln();
    }
    let n = labels.len().max(1) as f64;
    ((loss / n) as f32, (correct as f64 / n) as f32)
}

/// Evaluate every member on `raw` (preprocessed per member) and the ensemble of all of them.
pub fn evaluate(members: &mut [Member], raw: &Dataset, device: Device) -> Result<Report> {
    if members.is_empty() {
        return Err(Error::config(
            "ensemble",
            "empty",
            "needs at least one model",
        ));
    }
    let k = raw.num_classes();
    let mut sum = vec![0f64; raw.len() * k];
    let mut rows = Vec::new();
    for m in members.iter_mut() {
        let mut data = raw.clone();
        if let Some(p) = &m.preprocess {
            p.apply(&mut data)?;
        }
        let shape = m.model.output_shape(&[
            1,
            data.image_shape[0],
            data.image_shape[1],
            data.image_shape[2],
        ]);
        match shape {
            Ok(s) if s == [1, k] => {}
            Ok(s) => {
                return Err(Error::config(
                    "ensemble member",
                    &m.name,
                    &format!(
                        "outputs {} classes, the data has {k}",
                        s.last().copied().unwrap_or(0)
                    ),
                ))
            }
            Err(e) => {
                return Err(Error::config(
                    "ensemble member",
                    &m.name,
                    &format!("does not take this data: {e}"),
                ))
            }
        }
        let p = probabilities(m.model.as_mut(), &data, 256, device)?;
        let (loss, acc) = score(&p, &data.labels, k);
        rows.push((m.name.clone(), loss, acc));
        sum.iter_mut().zip(&p).for_each(|(s, &v)| *s += v as f64);
    }
    let n = members.len() as f64;
    let avg: Vec<f32> = sum.iter().map(|&s| (s / n) as f32).collect();
    let (loss, accuracy) = score(&avg, &raw.labels, k);
    Ok(Report {
        members: rows,
        loss,
        accuracy,
        samples: raw.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averaging_probabilities_can_beat_every_member() {
        // Two members, each right on a different half, confidently wrong nowhere: the average
        // is right on both halves where each member alone gets one.
        let labels = [0u32, 1];
        let a = [0.9, 0.1, 0.6, 0.4]; // right, wrong (weakly)
        let b = [0.4, 0.6, 0.1, 0.9]; // wrong (weakly), right
        assert_eq!(score(&a, &labels, 2).1, 0.5);
        assert_eq!(score(&b, &labels, 2).1, 0.5);
        let avg: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
        assert_eq!(score(&avg, &labels, 2).1, 1.0);
        // loss = -(ln 0.65 + ln 0.65) / 2
        assert!((score(&avg, &labels, 2).0 - -(0.65f32).ln()).abs() < 1e-6);
    }
}
