//! `regularization`: L1 and L2 regularization paths of a linear classifier (each weight against
//! lambda; L1 reaches exact zeros through its proximal step, soft-thresholding), dropout on and
//! off with the train/test gap, batch norm with the train/eval mistake, stochastic depth.

use anyhow::Result;
use regimen::data::Dataset;
use regimen::layer::{Ctx, Layer};
use regimen::loss::{CrossEntropy, Penalty};
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::train::evaluate;
use regimen::{models, Rng, Target, Tensor};

use super::report::Report;
use super::Data;
use crate::plot::{self, Plot, Series};

/// The weights `[classes, features]` of a linear softmax classifier trained by full-batch
/// gradient descent (`steps` steps at rate `lr`) with penalty `lambda`: L1 by the proximal
/// step `w <- sign(w) max(|w| - lr lambda, 0)` after each gradient step, L2 by its gradient
/// `2 lambda w`.
pub fn linear_path_point(
    d: &Dataset,
    l1: bool,
    lambda: f32,
    steps: usize,
    lr: f32,
) -> Result<Vec<f32>> {
    let mut m = models::for_input(
        "flatten,linear:classes",
        d.image_shape,
        d.num_classes(),
        &mut Rng::new(0),
    )?;
    // Start from zero, so that every path starts at the same point.
    m.visit_params("", &mut |_, p| {
        p.value = Tensor::zeros(p.value.shape(), regimen::Device::Cpu)
    });
    let idx: Vec<usize> = (0..d.len()).collect();
    let (x, y) = d.batch(&idx, regimen::Device::Cpu)?;
    let ce = CrossEntropy::new();
    let mut optim = Optim::new(Sgd::default(), OptimConfig::default())?;
    for _ in 0..steps {
        let logits = m.forward(&x, &Ctx::train())?;
        let out = ce.forward(&logits, Target::Hard(&y))?;
        m.backward(&out.grad)?;
        if !l1 && lambda > 0.0 {
            Penalty::L2 { lambda }.apply(&mut m);
        }
        optim.step(&mut m, lr)?;
        if l1 && lambda > 0.0 {
            let t = lr * lambda;
            m.visit_params("", &mut |name, p| {
                if name.ends_with("weight") {
                    let v: Vec<f32> = p
                        .value
                        .to_vec()
                        .iter()
                        .map(|&w| w.signum() * (w.abs() - t).max(0.0))
                        .collect();
                    p.value = Tensor::from_vec(p.value.shape(), v).expect("same shape");
                }
            });
        }
    }
    let mut w = Vec::new();
    m.visit_params("", &mut |name, p| {
        if name.ends_with("weight") {
            w = p.value.to_vec();
        }
    });
    Ok(w)
}

fn mlp_run(
    data: &Data,
    spec: &str,
    epochs: usize,
    train: &Dataset,
) -> Result<(f32, f32, regimen::layers::Sequential)> {
    let p = &data.prepared;
    let mut t = super::momentum_trainer(spec, train.clone(), epochs, 8, 0.02)?;
    super::run_training(&mut t)?;
    let (_, tr) = evaluate(&mut t.model, train, 256, regimen::Device::Cpu)?;
    let (_, te) = evaluate(&mut t.model, &p.test, 256, regimen::Device::Cpu)?;
    Ok((tr, te, t.model))
}

/// Accuracy on `d` evaluated in training mode (batch statistics, dropout on) in batches of `b`.
pub fn accuracy_in_train_mode(m: &mut dyn Layer, d: &Dataset, b: usize) -> Result<f32> {
    accuracy_over_passes(m, d, b, 1)
}

/// Accuracy of the softmax averaged over `passes` forward passes in training mode, each with
/// its own random masks (Monte Carlo over dropout's masks; one pass: a single random network).
pub fn accuracy_over_passes(
    m: &mut dyn Layer,
    d: &Dataset,
    b: usize,
    passes: usize,
) -> Result<f32> {
    let mut correct = 0usize;
    let idx: Vec<usize> = (0..d.len()).collect();
    for (i, chunk) in idx.chunks(b).enumerate() {
        let (x, y) = d.batch(chunk, regimen::Device::Cpu)?;
        let mut mean: Vec<f64> = Vec::new();
        for pass in 0..passes {
            let step = regimen::Indices::from_vec(vec![(i * passes + pass) as u32 + 1]);
            let logits = m.forward(&x, &Ctx::train().at_step(&step))?.to_vec();
            let k = logits.len() / chunk.len();
            mean.resize(logits.len(), 0.0);
            for (row, acc) in logits.chunks(k).zip(mean.chunks_mut(k)) {
                let top = row.iter().fold(f32::MIN, |a, &v| a.max(v));
                let z: f64 = row.iter().map(|&v| ((v - top) as f64).exp()).sum();
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += ((v - top) as f64).exp() / z / passes as f64;
                }
            }
        }
        let k = mean.len() / chunk.len();
        for (row, &label) in mean.chunks(k).zip(y.to_vec().iter()) {
            let arg = (0..k).fold(0, |a, c| if row[c] > row[a] { c } else { a });
            correct += (arg == label as usize) as usize;
        }
    }
    Ok(correct as f32 / d.len() as f32)
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    let p = &data.prepared;
    r.heading(1, "Regularization");
    let n = if quick { 300 } else { 2000 };
    let small = p
        .train
        .subset(&(0..p.train.len().min(n)).collect::<Vec<_>>());
    let lambdas: Vec<f32> = (0..if quick { 6 } else { 12 })
        .map(|i| 1e-4 * 10f32.powf(i as f32 * if quick { 0.6 } else { 0.3 }))
        .collect();
    let steps = if quick { 100 } else { 300 };
    r.heading(2, "L1 and L2 paths");
    r.text(&format!(
        "A linear softmax classifier on {} images, full-batch gradient descent ({steps} steps at rate 0.5) from zero weights, for each lambda. L2 adds `2 lambda w` to the gradient and shrinks every weight smoothly; L1's proximal step (soft-thresholding, `w <- sign(w) max(|w| - lr lambda, 0)`) sets weights exactly to zero, more of them as lambda grows: a sparse model.",
        small.len()
    ));
    let features = small.image_len();
    // The 12 weights of class 0 largest without penalty.
    let w0 = linear_path_point(&small, false, 0.0, steps, 0.5)?;
    let mut order: Vec<usize> = (0..features).collect();
    order.sort_by(|&a, &b| w0[b].abs().partial_cmp(&w0[a].abs()).expect("finite"));
    let shown = &order[..12.min(features)];
    let mut rows = Vec::new();
    for (kind, l1) in [("L1", true), ("L2", false)] {
        let mut paths: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shown.len()];
        for &lam in &lambdas {
            let w = linear_path_point(&small, l1, lam, steps, 0.5)?;
            for (k, &f) in shown.iter().enumerate() {
                paths[k].push((lam.log10() as f64, w[f] as f64));
            }
            let zeros = w.iter().filter(|&&v| v == 0.0).count();
            rows.push(vec![
                kind.to_string(),
                format!("{lam:.1e}"),
                format!("{zeros} of {}", w.len()),
                format!("{:.4}", w.iter().map(|v| v.abs()).sum::<f32>()),
            ]);
        }
        let series: Vec<Series> = paths
            .into_iter()
            .enumerate()
            .map(|(k, pts)| Series::new(&format!("w[0, {}]", shown[k]), pts))
            .collect();
        let file = format!("regularization-{}.png", kind.to_lowercase());
        plot::lines(
            &r.path(&file),
            &Plot {
                title: &format!("{kind} path: weights of class 0 against lambda"),
                x_label: "log10 lambda",
                y_label: "weight",
                log_y: false,
            },
            &series,
        )?;
        r.figure(
            &file,
            &format!("The {kind} regularization path of the 12 largest weights of class 0."),
        );
    }
    r.table(&["penalty", "lambda", "exact zeros", "sum |w|"], rows);

    let epochs = if quick { 10 } else { 30 };
    r.heading(2, "Dropout");
    let (tr0, te0, _) = mlp_run(
        data,
        "flatten,linear:512,relu,linear:512,relu,linear:classes",
        epochs,
        &small,
    )?;
    let (tr1, te1, mut m1) = mlp_run(
        data,
        "flatten,linear:512,relu,dropout:0.5,linear:512,relu,dropout:0.5,linear:classes",
        epochs,
        &small,
    )?;
    let noisy = accuracy_in_train_mode(&mut m1, &p.test, 256)?;
    let passes = 20;
    let averaged = accuracy_over_passes(&mut m1, &p.test, 256, passes)?;
    let (gap0, gap1) = (tr0 - te0, tr1 - te1);
    let outcome = if gap1 < gap0 {
        format!(
            "Here dropout narrowed the gap between training and test accuracy from {:.2} to {:.2} points, as the lecture says it should.",
            100.0 * gap0,
            100.0 * gap1
        )
    } else {
        format!(
            "Here dropout did not narrow the gap between training and test accuracy ({:.2} points without, {:.2} with), which the lecture expects it to.",
            100.0 * gap0,
            100.0 * gap1
        )
    };
    r.text(&format!(
        "A wide MLP on {} images, {epochs} epochs, without and with dropout 0.5. {outcome} At test time the lecture multiplies each unit by the keep probability p, so that a unit's output is its expectation over the masks (`E[a] = p (w1 x + w2 y)`); inverted dropout, used here, divides the kept units by p during training instead, so that evaluation is the plain network with no rescaling. That one deterministic pass stands for the average over the masks, the ensemble dropout trains: the softmax averaged over {passes} passes with random masks gives {:.2}% test accuracy, the deterministic pass {:.2}%, and a single random pass (dropout left on at test time by mistake) {:.2}%.",
        small.len(),
        100.0 * averaged,
        100.0 * te1,
        100.0 * noisy
    ));
    r.table(
        &["model", "train accuracy", "test accuracy", "gap (points)"],
        vec![
            vec![
                "no dropout".into(),
                format!("{:.2}%", 100.0 * tr0),
                format!("{:.2}%", 100.0 * te0),
                format!("{:.2}", 100.0 * (tr0 - te0)),
            ],
            vec![
                "dropout 0.5".into(),
                format!("{:.2}%", 100.0 * tr1),
                format!("{:.2}%", 100.0 * te1),
                format!("{:.2}", 100.0 * (tr1 - te1)),
            ],
        ],
    );

    r.heading(2, "Batch norm: the train/eval mistake");
    let (_, te_bn, mut bn) = mlp_run(
        data,
        "conv:16,bn,relu,maxpool:2,conv:32,bn,relu,gap,linear:classes",
        if quick { 15 } else { 5 },
        &p.train,
    )?;
    let b256 = accuracy_in_train_mode(&mut bn, &p.test, 256)?;
    let b8 = accuracy_in_train_mode(&mut bn, &p.test, 8)?;
    let b1 = accuracy_in_train_mode(&mut bn, &p.test, 1)?;
    r.text("A CNN with batch norm, evaluated correctly (running statistics) and by mistake in training mode, where each test batch is normalized by its own statistics: the prediction for an image then depends on the other images of its batch, and on a batch of one the features collapse.");
    r.table(
        &["evaluation", "test accuracy"],
        vec![
            vec![
                "eval mode (running statistics)".into(),
                format!("{:.2}%", 100.0 * te_bn),
            ],
            vec![
                "train mode, batches of 256".into(),
                format!("{:.2}%", 100.0 * b256),
            ],
            vec![
                "train mode, batches of 8".into(),
                format!("{:.2}%", 100.0 * b8),
            ],
            vec![
                "train mode, batches of 1".into(),
                format!("{:.2}%", 100.0 * b1),
            ],
        ],
    );

    r.heading(2, "Stochastic depth");
    let e = if quick { 2 } else { 6 };
    let mut rows = Vec::new();
    let mut tests = Vec::new();
    for (name, sd) in [
        ("no stochastic depth", 0.0),
        ("stochastic depth up to 0.3", 0.3),
    ] {
        let spec = format!("conv:16:3:1:1:nobias,res:16:1:{},res:16:1:{},res:32:2:{},res:32:1:{},bn,relu,gap,linear:classes", sd * 0.25, sd * 0.5, sd * 0.75, sd);
        let (tr, te, _) = mlp_run(data, &spec, e, &small)?;
        tests.push(te);
        rows.push(vec![
            name.to_string(),
            format!("{:.2}%", 100.0 * tr),
            format!("{:.2}%", 100.0 * te),
        ]);
    }
    r.text(&format!("A small pre-activation ResNet (four residual blocks) on {} images, {e} epochs, without and with stochastic depth (each block's branch dropped per sample with a probability rising linearly to 0.3 in training; scaled by its survival probability in evaluation).", small.len()));
    r.table(&["model", "train accuracy", "test accuracy"], rows);
    near_chance(r, &tests, small.num_classes(), quick);

    r.heading(2, "Fractional max pooling");
    let mut rows = Vec::new();
    let mut tests = Vec::new();
    for (name, pool) in [
        ("2x2 max pooling", "maxpool:2"),
        ("fractional max pooling (ratio 1/sqrt 2, twice)", "fmp,fmp"),
    ] {
        let spec = format!("conv:16,bn,relu,{pool},conv:32,bn,relu,gap,linear:classes");
        let (tr, te, _) = mlp_run(data, &spec, e, &small)?;
        tests.push(te);
        rows.push(vec![
            name.to_string(),
            format!("{:.2}%", 100.0 * tr),
            format!("{:.2}%", 100.0 * te),
            format!("{:.2}", 100.0 * (tr - te)),
        ]);
    }
    r.text(&format!("A small CNN on {} images, {e} epochs, with one 2x2 max pool, or with two fractional max pools of ratio 1/sqrt 2 (about the same reduction; Graham 2014). In training each fractional pool draws its pooling regions at random per sample, a regularizer like dropout; in evaluation the regions are fixed (the draw u = 0.5).", small.len()));
    r.table(
        &["model", "train accuracy", "test accuracy", "gap (points)"],
        rows,
    );
    near_chance(r, &tests, small.num_classes(), quick);
    Ok(())
}

/// Says so when every model of a comparison is still near chance (under twice its accuracy):
/// their differences are then noise, not the regularizer's effect.
fn near_chance(r: &mut Report, test_accuracies: &[f32], classes: usize, quick: bool) {
    let best = test_accuracies.iter().fold(0f32, |a, &b| a.max(b));
    let chance = 1.0 / classes as f32;
    if best < 2.0 * chance {
        r.text(&format!(
            "Every model here is still near chance (best {:.2}% test accuracy; chance {:.2}%): this budget is too small to compare them, and their differences are noise.{}",
            100.0 * best,
            100.0 * chance,
            if quick {
                " Run the lab without --quick for the comparison."
            } else {
                ""
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_reaches_exact_zeros_and_l2_does_not() {
        let d = regimen::data::digits()
            .unwrap()
            .subset(&(0..200).collect::<Vec<_>>());
        let mut d = d;
        let (m, s) = d.pixel_mean_std();
        d.normalize(m, s);
        let l1 = linear_path_point(&d, true, 0.01, 100, 0.5).unwrap();
        let l2 = linear_path_point(&d, false, 0.01, 100, 0.5).unwrap();
        let zeros = |w: &[f32]| w.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros(&l1) > l1.len() / 4, "{} of {}", zeros(&l1), l1.len());
        // Pixels that are constant over the subset have zero gradient and stay at zero under
        // both; L2 makes no other exact zero.
        let dead = linear_path_point(&d, false, 0.0, 100, 0.5).unwrap();
        assert_eq!(zeros(&l2), zeros(&dead));
        // A larger lambda, more zeros.
        let l1_big = linear_path_point(&d, true, 0.05, 100, 0.5).unwrap();
        assert!(zeros(&l1_big) > zeros(&l1));
    }

    #[test]
    fn batch_norm_in_train_mode_on_single_images_breaks_predictions() {
        let data = Data::load(true, None).unwrap();
        let (_, te, mut m) = mlp_run(
            &data,
            "conv:16,bn,relu,maxpool:2,conv:32,bn,relu,gap,linear:classes",
            15,
            &data.prepared.train,
        )
        .unwrap();
        let b1 = accuracy_in_train_mode(&mut m, &data.prepared.test, 1).unwrap();
        assert!(te > 0.8, "{te}");
        assert!(b1 < te - 0.2, "{b1} vs {te}");
    }
}
