//! `augmentation`: a gallery of each augmentation on real samples (Cutout, Mixup and CutMix
//! with their mixed labels), and a table in the style of the CutMix paper: baseline, Mixup,
//! Cutout and CutMix on the same network and budget.

use anyhow::Result;
use regimen::data::Pipeline;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::schedule::parse_schedule;
use regimen::train::FitConfig;
use regimen::trainer::Trainer;
use regimen::{models, Rng};

use super::report::Report;
use super::Data;

const SPEC: &str = "conv:16,bn,relu,maxpool:2,conv:32,bn,relu,gap,linear:classes";

pub const GALLERY: &[(&str, &str)] = &[
    ("random crop", "crop=2"),
    ("horizontal flip", "flip=1"),
    ("scale (random resized crop)", "scale=0.5"),
    ("rotation", "rotate=20"),
    ("translation", "translate=3"),
    ("Gaussian noise", "noise=0.3"),
    ("Cutout", "cutout=10"),
    ("Mixup", "mixup=1.0"),
    ("CutMix", "cutmix=1.0"),
];

/// Train [`SPEC`] with `augment` for `epochs`; the test accuracy.
pub fn accuracy(data: &Data, augment: &str, epochs: usize, n: usize) -> Result<f32> {
    let p = &data.prepared;
    let train = p
        .train
        .subset(&(0..p.train.len().min(n)).collect::<Vec<_>>());
    let model = models::for_input(
        SPEC,
        p.train.image_shape,
        p.train.num_classes(),
        &mut Rng::new(3),
    )?;
    let optim = Optim::new(
        Sgd {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
        },
        OptimConfig {
            weight_decay: 5e-4,
            ..Default::default()
        },
    )?;
    let per_epoch = train.len().div_ceil(64);
    let s = parse_schedule("onecycle:pct=0.2", 0.05, epochs * per_epoch, 0, None)?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed: 3,
        augment: Pipeline::parse(augment)?,
        workers: 1,
        ..Default::default()
    };
    let mut t = Trainer::new(model, optim, s, fit, train).with_test(Some(p.test.clone()));
    Ok(super::run_training(&mut t)?.test.expect("a test set").1)
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    r.heading(1, "Augmentation");
    r.text("Each augmentation on the same eight training images (top: original, bottom: augmented; under each, its label or, for Mixup and CutMix, its mixed labels as CLASS:WEIGHT). Pixels are shown after normalization, mapped from the originals' range to black..white (one map for both rows: a Cutout fill of 0 is the mean pixel).");
    let d = &data.prepared.train;
    let mut rng = Rng::new(5);
    let idx: Vec<usize> = (0..8).map(|_| rng.below(d.len())).collect();
    for (i, (name, spec)) in GALLERY.iter().enumerate() {
        let mut spec = spec.to_string();
        let mut pipeline = Pipeline::parse(&spec)?;
        if pipeline.check_image_shape(d.image_shape).is_err() && spec.starts_with("cutout=") {
            // A square half the image's side on small images (the 8x8 digits).
            spec = format!("cutout={}", (d.image_shape[1] / 2).max(1));
            pipeline = Pipeline::parse(&spec)?;
        }
        if let Err(e) = pipeline.check_image_shape(d.image_shape) {
            r.heading(2, name);
            r.text(&format!("Not shown: {e}."));
            continue;
        }
        let canvas = crate::data_cmd::preview(d, &idx, &pipeline, &mut Rng::new(7 + i as u64));
        let file = format!("augment-{i}.png");
        canvas.save(&r.path(&file))?;
        r.heading(2, name);
        r.figure(&file, &format!("{name} (`{spec}`)"));
    }
    let (epochs, n) = if quick { (3, usize::MAX) } else { (15, 10_000) };
    let n = n.min(data.prepared.train.len());
    r.heading(2, "Same network, same budget");
    r.text(&format!(
        "The CNN `{SPEC}` trained {epochs} epochs (SGD Nesterov, one-cycle to 0.05, weight decay 5e-4, batch 64) on {n} training images of {} with each regularizing augmentation, as in the CutMix paper's comparison (Yun et al. 2019, Table 1: baseline, Mixup, Cutout, CutMix).",
        data.set
    ));
    let mut rows = Vec::new();
    let mut gains = Vec::new();
    let base = accuracy(data, "none", epochs, n)?;
    rows.push(vec![
        "baseline".to_string(),
        format!("{:.2}%", 100.0 * base),
        String::new(),
    ]);
    let side = (d.image_shape[1] / 2).clamp(1, 8);
    let cutout = format!("cutout={side}");
    for (name, spec) in [
        ("Mixup (alpha 1)".to_string(), "mixup=1.0"),
        (format!("Cutout ({side}x{side})"), cutout.as_str()),
        ("CutMix (alpha 1)".to_string(), "cutmix=1.0"),
    ] {
        let a = accuracy(data, spec, epochs, n)?;
        gains.push((name.clone(), a - base));
        rows.push(vec![
            name.to_string(),
            format!("{:.2}%", 100.0 * a),
            format!("{:+.2}", 100.0 * (a - base)),
        ]);
    }
    r.table(
        &["augmentation", "test accuracy", "vs baseline (points)"],
        rows,
    );
    let better: Vec<&str> = gains
        .iter()
        .filter(|(_, g)| *g > 0.0)
        .map(|(name, _)| name.as_str())
        .collect();
    r.text(&format!(
        "In this run {} of the {} beat the baseline{}. Each makes the training task harder, so it needs a longer schedule to pay off: the CutMix paper trained for 300 epochs, against {epochs} here.",
        better.len(),
        gains.len(),
        if better.is_empty() {
            String::new()
        } else {
            format!(" ({})", better.join(", "))
        }
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CutMix's label weights equal the pasted area: with every image a constant of its own,
    /// the share of each image's pixels in a mixed sample is its label weight.
    #[test]
    fn cutmix_label_weights_equal_the_pasted_area() {
        let (n, c, h, w) = (6, 1, 16, 16);
        let images: Vec<f32> = (0..n)
            .flat_map(|i| vec![i as f32 + 1.0; c * h * w])
            .collect();
        let labels: Vec<u32> = (0..n as u32).collect();
        let p = Pipeline::parse("cutmix=1.0").unwrap();
        let mut mixed = 0;
        for seed in 0..20 {
            let mut imgs = images.clone();
            let soft = p
                .apply(&mut imgs, [c, h, w], &labels, n, &mut Rng::new(seed))
                .unwrap();
            for i in 0..n {
                let img = &imgs[i * h * w..(i + 1) * h * w];
                for k in 0..n {
                    let share = img.iter().filter(|&&v| v == k as f32 + 1.0).count() as f32
                        / (h * w) as f32;
                    assert!(
                        (share - soft[i * n + k]).abs() < 1e-6,
                        "sample {i}, class {k}: {share} vs {}",
                        soft[i * n + k]
                    );
                }
                mixed += (soft[i * n + i] < 1.0) as usize;
            }
        }
        assert!(mixed > 0, "some samples were mixed");
    }
}
