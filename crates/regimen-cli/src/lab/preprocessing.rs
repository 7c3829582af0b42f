//! `preprocessing`: the lecture's picture of original, zero-centered, normalized, decorrelated
//! and whitened data (regimen's own `Preprocessor` on a 2-D point cloud), and the effect of each
//! preprocessing on training a network on real data.

use anyhow::Result;
use regimen::data::{Dataset, PreprocessKind, Preprocessor};
use regimen::trainer::Prepared;
use regimen::Rng;

use super::report::Report;
use super::Data;
use crate::plot;

/// A correlated, offset 2-D Gaussian cloud as a dataset of `[2, 1, 1]` "images".
pub fn cloud(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut images = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let (a, b) = (rng.normal(), rng.normal());
        // Stretched along a diagonal and moved away from the origin.
        images.push((3.0 + 2.0 * a + 0.8 * b) as f32);
        images.push((2.0 + 1.2 * a + 0.3 * b) as f32);
    }
    Dataset {
        images,
        labels: vec![0; n],
        image_shape: [2, 1, 1],
        class_names: vec!["x".into()],
    }
}

/// Mean and covariance `[[sxx, sxy], [sxy, syy]]` of a cloud.
pub fn moments(d: &Dataset) -> ([f64; 2], [f64; 3]) {
    let n = d.len() as f64;
    let (mut mx, mut my) = (0.0, 0.0);
    for p in d.images.chunks(2) {
        mx += p[0] as f64;
        my += p[1] as f64;
    }
    let (mx, my) = (mx / n, my / n);
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for p in d.images.chunks(2) {
        let (x, y) = (p[0] as f64 - mx, p[1] as f64 - my);
        sxx += x * x;
        sxy += x * y;
        syy += y * y;
    }
    ([mx, my], [sxx / n, sxy / n, syy / n])
}

/// The cloud under each step of the lecture's picture.
pub fn steps(d: &Dataset) -> Result<Vec<(&'static str, Dataset)>> {
    let mut out = vec![("original", d.clone())];
    for (name, kind) in [
        ("zero-centered", PreprocessKind::MeanImage),
        ("normalized", PreprocessKind::PerChannel),
        ("decorrelated (PCA)", PreprocessKind::Pca(2)),
        ("whitened", PreprocessKind::Whiten(2)),
    ] {
        let p = Preprocessor::fit(kind, d)?;
        let mut x = d.clone();
        p.apply(&mut x)?;
        out.push((name, x));
    }
    Ok(out)
}

/// Of `n` single training images (preprocessed by `kind`, fitted on `train`), how many give a
/// sigmoid neuron weight gradients that all share one sign (zeros aside), and `n`.
pub fn same_sign_share(train: &Dataset, kind: PreprocessKind, n: usize) -> Result<(usize, usize)> {
    use regimen::backend::Unary;
    use regimen::layer::{Ctx, Layer};
    use regimen::layers::{Activation, Linear, Sequential};
    use regimen::Tensor;
    let mut d = train.subset(&(0..n.min(train.len())).collect::<Vec<_>>());
    let p = Preprocessor::fit(kind, train)?;
    p.apply(&mut d)?;
    let len = d.image_len();
    let mut rng = Rng::new(9);
    let mut neuron = Sequential::new()
        .push(Linear::new(len, 1, &mut rng))
        .push(Activation::new(Unary::Sigmoid));
    let mut same = 0;
    for i in 0..d.len() {
        let x = Tensor::from_vec(&[1, len], d.images[i * len..(i + 1) * len].to_vec())?;
        regimen::layer::zero_grads(&mut neuron);
        neuron.forward(&x, &Ctx::train())?;
        let up = if rng.next_f64() < 0.5 { 1.0 } else { -1.0 };
        neuron.backward(&Tensor::from_vec(&[1, 1], vec![up])?)?;
        let mut g = Vec::new();
        neuron.visit_params("", &mut |name, p| {
            if name.ends_with("weight") {
                g = p.grad.to_vec();
            }
        });
        let pos = g.iter().any(|&v| v > 0.0);
        let neg = g.iter().any(|&v| v < 0.0);
        same += usize::from(!(pos && neg));
    }
    Ok((same, d.len()))
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    r.heading(1, "Data preprocessing");
    r.text("A correlated 2-D point cloud (500 points) through regimen's preprocessing: zero-centering (subtract the mean), normalization (divide each feature by its standard deviation), decorrelation (rotate onto the principal axes, PCA) and whitening (PCA, then divide each axis by its standard deviation: covariance = identity).");
    let c = cloud(500, 1);
    let st = steps(&c)?;
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    for (name, d) in &st {
        let (m, s) = moments(d);
        rows.push(vec![
            name.to_string(),
            format!("({:.3}, {:.3})", m[0], m[1]),
            format!("[[{:.3}, {:.3}], [{:.3}, {:.3}]]", s[0], s[1], s[1], s[2]),
        ]);
        panels.push((
            name.to_string(),
            d.images
                .chunks(2)
                .map(|p| (p[0] as f64, p[1] as f64))
                .collect(),
        ));
    }
    plot::scatter(
        &r.path("preprocessing-cloud.png"),
        "The same points after each step",
        &panels,
    )?;
    r.figure("preprocessing-cloud.png", "Original, zero-centered, normalized, decorrelated and whitened data (both axes share one scale in every panel).");
    r.table(&["data", "mean", "covariance"], rows);

    let splits = data.raw()?;
    r.heading(
        2,
        "Why zero-centered inputs: the signs of a neuron's gradients",
    );
    let samples = if quick { 200 } else { 1000 };
    let mut rows = Vec::new();
    for (name, kind) in [
        ("pixels in [0, 1] (all positive)", PreprocessKind::None),
        ("zero-centered (mean image)", PreprocessKind::MeanImage),
    ] {
        let (same, n) = same_sign_share(&splits.0, kind, samples)?;
        rows.push(vec![
            name.to_string(),
            format!(
                "{same} of {n} ({:.1}%)",
                100.0 * same as f64 / n.max(1) as f64
            ),
        ]);
    }
    r.text(&format!("One sigmoid neuron `sigmoid(w . x + b)` on single training images of {} (regimen's Linear and Sigmoid layers, forward and backward, upstream gradient +1 or -1 at random): how often all the weights' gradients share one sign. The gradient on w_i is the upstream gradient times sigmoid' (positive) times x_i, so with inputs that are all positive every w_i moves the same way in a step, and reaching a w whose entries differ in sign takes a zig-zag; zero-centering the data removes it.", data.name));
    r.table(
        &[
            "inputs",
            "samples whose weight gradients all share one sign",
        ],
        rows,
    );

    let epochs = if quick { 3 } else { 6 };
    r.heading(2, "The effect on training");
    r.text(&format!(
        "The MLP `{}` trained {epochs} epochs (SGD, momentum 0.9, lr 0.01, batch 64) on {} with each preprocessing of the images (fitted on the training split, applied to all splits).",
        super::MLP,
        data.name
    ));
    let k = if quick { 16 } else { 64 }
        .min(splits.0.image_len() / 2)
        .max(1);
    let (pca_name, white_name) = (
        format!("PCA to {k} dimensions"),
        format!("whitened to {k} dimensions"),
    );
    let mut rows = Vec::new();
    for (name, kind) in [
        ("none (pixels in [0, 1])", PreprocessKind::None),
        ("zero-centered (mean image)", PreprocessKind::MeanImage),
        ("normalized (one mean, one std)", PreprocessKind::Normalize),
        (pca_name.as_str(), PreprocessKind::Pca(k)),
        (white_name.as_str(), PreprocessKind::Whiten(k)),
    ] {
        let p = Prepared::new(splits.0.clone(), splits.1.clone(), kind, 0.1, 0)?;
        let mut t = super::momentum_trainer(super::MLP, p.train, epochs, 1, 0.01)?
            .with_validation(p.validation);
        super::run_training(&mut t)?;
        let h = t.history();
        rows.push(vec![
            name.to_string(),
            format!("{:.4}", h[0].train_loss),
            format!("{:.4}", h.last().expect("epochs").train_loss),
            format!(
                "{:.2}%",
                100.0 * h.last().expect("epochs").val_acc.unwrap_or(f32::NAN)
            ),
        ]);
    }
    r.table(
        &[
            "preprocessing",
            "train loss, epoch 1",
            "final train loss",
            "validation accuracy",
        ],
        rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lecture's claim, measured: all-positive pixels give one sign for every weight of a
    /// sigmoid neuron on every sample; zero-centered pixels almost never.
    #[test]
    fn positive_inputs_give_weight_gradients_of_one_sign() {
        let d = regimen::data::load("digits", None).unwrap().train;
        let (same, n) = same_sign_share(&d, PreprocessKind::None, 100).unwrap();
        assert_eq!(same, n);
        let (same, n) = same_sign_share(&d, PreprocessKind::MeanImage, 100).unwrap();
        assert!(same * 10 < n, "{same} of {n}");
    }

    #[test]
    fn each_step_does_what_the_lecture_draws() {
        let st = steps(&cloud(2000, 3)).unwrap();
        let (m0, s0) = moments(&st[0].1);
        assert!(m0[0] > 2.5 && s0[1].abs() > 1.0, "offset and correlated");
        let (m1, _) = moments(&st[1].1);
        assert!(m1[0].abs() < 1e-4 && m1[1].abs() < 1e-4, "centered: {m1:?}");
        let (_, s2) = moments(&st[2].1);
        assert!(
            (s2[0] - 1.0).abs() < 1e-3 && (s2[2] - 1.0).abs() < 1e-3,
            "unit variances: {s2:?}"
        );
        let (_, s3) = moments(&st[3].1);
        assert!(s3[1].abs() < 1e-3 * s3[0], "decorrelated: {s3:?}");
        let (_, s4) = moments(&st[4].1);
        assert!(
            (s4[0] - 1.0).abs() < 1e-2 && (s4[2] - 1.0).abs() < 1e-2 && s4[1].abs() < 1e-3,
            "whitened: {s4:?}"
        );
    }
}
