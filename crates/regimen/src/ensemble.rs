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
///
/// An image whose outputs hold a NaN or +infinity, or are all -infinity (a damaged
/// checkpoint, weights or preprocessing that overflow), is an error naming `name` (the model's
/// file), never a probability row that would be scored as class 0.
pub fn probabilities(
    model: &mut dyn Layer,
    data: &Dataset,
    batch_size: usize,
    device: Device,
    name: &str,
) -> Result<Vec<f32>> {
    let k = data.num_classes();
    let mut out = Vec::with_capacity(data.len() * k);
    let idx: Vec<usize> = (0..data.len()).collect();
    let (mut bad, mut first) = (0usize, None);
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, _) = data.batch(chunk, device)?;
        let logits = model.forward(&x, &Ctx::eval())?;
        let classes = logits.shape()[1];
        let v = logits.to_vec();
        for (row, &i) in v.chunks(classes).zip(chunk) {
            // -inf is a class ruled out (softmax gives it 0); NaN, +inf, or every class
            // ruled out, is a damaged model.
            let usable = row.iter().all(|z| !z.is_nan() && *z != f32::INFINITY)
                && row.iter().any(|z| z.is_finite());
            if !usable {
                bad += 1;
                first.get_or_insert(i);
                out.extend(std::iter::repeat_n(f32::NAN, classes));
                continue;
            }
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&z| ((z - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            out.extend(e.iter().map(|&p| (p / s) as f32));
        }
    }
    if let Some(i) = first {
        return Err(Error::Data {
            file: name.to_string(),
            reason: format!(
                "the model's outputs are not finite (NaN or infinity) for {bad} of {} images \
                 (the first is image {i}): its weights or preprocessing are damaged or overflow",
                data.len()
            ),
        });
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
        let p = probabilities(m.model.as_mut(), &data, 256, device, &m.name)?;
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

    #[test]
    fn non_finite_outputs_are_an_error_naming_the_model() {
        let mut rng = crate::Rng::new(1);
        let mut model =
            crate::models::for_input("flatten,linear:classes", [1, 2, 2], 3, &mut rng).unwrap();
        let mut data = Dataset {
            images: vec![0.5; 3 * 4],
            labels: vec![0, 1, 2],
            image_shape: [1, 2, 2],
            class_names: vec!["a".into(), "b".into(), "c".into()],
        };
        let p = probabilities(&mut model, &data, 2, Device::Cpu, "m.safetensors").unwrap();
        assert!(p.iter().all(|v| v.is_finite()) && p.len() == 9);
        // A class ruled out (-inf) is a legal output: softmax gives it 0.
        let mut rows =
            crate::models::for_input("flatten,linear:classes", [1, 2, 2], 3, &mut rng).unwrap();
        rows.visit_params("", &mut |n, p| {
            if n.ends_with("bias") {
                let mut b = p.value.to_vec();
                b[2] = f32::NEG_INFINITY;
                p.value = crate::Tensor::from_vec(&[3], b).unwrap();
            }
        });
        let p = probabilities(&mut rows, &data, 2, Device::Cpu, "m.safetensors").unwrap();
        assert!(
            p.chunks(3)
                .all(|r| r[2] == 0.0 && (r[0] + r[1] - 1.0).abs() < 1e-6),
            "{p:?}"
        );
        // Image 1 overflows (an infinite pixel, as a damaged preprocessing gives): refused,
        // where its NaN row would have been scored as class 0.
        data.images[5] = f32::INFINITY;
        let e = probabilities(&mut model, &data, 2, Device::Cpu, "m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("m.safetensors: ")
                && e.contains("not finite")
                && e.contains("1 of 3 images (the first is image 1)"),
            "{e}"
        );
    }
}
