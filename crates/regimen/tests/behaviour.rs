//! Behaviour tests: train/eval differences, randomness, errors, summaries, hooks, and the
//! lecture's initialization experiment.

mod common;

use std::sync::{Arc, Mutex};

use common::randn;
use regimen::layer::{Ctx, Layer};
use regimen::layers::*;
use regimen::loss::CrossEntropy;
use regimen::{models, Error, Indices, Init, Rng, Target, Tensor};

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (
        m,
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

#[test]
fn dropout_drops_p_scales_survivors_and_is_identity_in_eval() {
    let mut d = Dropout::new(0.3).unwrap();
    let x = Tensor::full(&[100, 100], 1.0, regimen::Device::Cpu);
    let y = d.forward(&x, &Ctx::train()).unwrap().to_vec();
    let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / 1e4;
    // 10,000 Bernoulli(0.3) draws: standard error 0.0046.
    assert!((zeros - 0.3).abs() < 0.02, "dropped fraction {zeros}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    let (m, _) = mean_std(&y);
    assert!(
        (m - 1.0).abs() < 0.03,
        "inverted dropout keeps the mean: {m}"
    );
    // A new mask at the next step, the same mask again at the same step and stream, and
    // another mask under another stream key.
    let step1 = Indices::from_vec(vec![1]);
    let y2 = d
        .forward(&x, &Ctx::train().at_step(&step1))
        .unwrap()
        .to_vec();
    assert_ne!(y, y2);
    assert_eq!(y, d.forward(&x, &Ctx::train()).unwrap().to_vec());
    d.reseed(5);
    let a = d.forward(&x, &Ctx::train()).unwrap().to_vec();
    assert_ne!(a, y);
    d.reseed(5);
    assert_eq!(a, d.forward(&x, &Ctx::train()).unwrap().to_vec());
    assert_eq!(d.forward(&x, &Ctx::eval()).unwrap().to_vec(), x.to_vec());
    assert!(Dropout::new(1.0).is_err() && Dropout::new(-0.1).is_err());
}

#[test]
fn two_dropout_layers_in_a_model_draw_different_masks() {
    let mut m = Sequential::new()
        .push(Dropout::new(0.5).unwrap())
        .push(Flatten::new())
        .push(Dropout::new(0.5).unwrap());
    let outputs = Arc::new(Mutex::new(Vec::new()));
    let h = outputs.clone();
    m.set_hook(Box::new(move |name, t| {
        h.lock().unwrap().push((name.to_string(), t.to_vec()))
    }));
    m.forward(
        &Tensor::full(&[4, 64], 1.0, regimen::Device::Cpu),
        &Ctx::train(),
    )
    .unwrap();
    let outs = outputs.lock().unwrap();
    let kept = |name: &str| -> Vec<bool> {
        outs.iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .iter()
            .map(|&v| v != 0.0)
            .collect()
    };
    // In the same forward, layer 2 sees layer 0's output: its survivors are a subset of layer
    // 0's. Shared masks would keep all of them (about 128); independent masks about half.
    let (first, second) = (kept("0"), kept("2"));
    assert!(second.iter().zip(&first).all(|(s, f)| !s || *f));
    let (n0, n2) = (
        first.iter().filter(|&&k| k).count(),
        second.iter().filter(|&&k| k).count(),
    );
    assert!(
        n0 > 100 && n2 < n0 * 3 / 4,
        "layer 0 kept {n0}, layer 2 {n2}"
    );
}

#[test]
fn stochastic_depth_drops_whole_branches_in_training_and_scales_in_eval() {
    let rng = &mut Rng::new(1);
    let branch = Sequential::new().push(Linear::new(4, 4, rng)).push(tanh());
    let mut r = Residual::new(branch).stochastic_depth(0.5).unwrap();
    let x = randn(&[64, 4], 2);
    let y = r.forward(&x, &Ctx::train()).unwrap().to_vec();
    let xv = x.to_vec();
    let dropped = (0..64)
        .filter(|&n| (0..4).all(|j| y[n * 4 + j] == xv[n * 4 + j]))
        .count();
    // 64 Bernoulli(0.5) draws: 32 +- 4.
    assert!(
        (20..=44).contains(&dropped),
        "{dropped} of 64 branches dropped"
    );
    // Eval: x + (1 - p) branch(x).
    let mut plain = Residual::new(
        Sequential::new()
            .push(Linear::new(4, 4, &mut Rng::new(1)))
            .push(tanh()),
    );
    let full = plain.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let eval = r.forward(&x, &Ctx::eval()).unwrap().to_vec();
    for i in 0..xv.len() {
        let want = xv[i] + 0.5 * (full[i] - xv[i]);
        assert!((eval[i] - want).abs() < 1e-6);
    }
}

#[test]
fn batch_norm_normalizes_in_training_and_uses_running_stats_in_eval() {
    let mut bn = BatchNorm::d2(2);
    let x: Vec<f32> = randn(&[8, 2, 3, 3], 3)
        .to_vec()
        .iter()
        .map(|v| 5.0 + 3.0 * v)
        .collect();
    let x = Tensor::from_vec(&[8, 2, 3, 3], x).unwrap();
    for _ in 0..200 {
        bn.forward(&x, &Ctx::train()).unwrap();
    }
    let y = bn.forward(&x, &Ctx::train()).unwrap().to_vec();
    for c in 0..2 {
        let vals: Vec<f32> = (0..8)
            .flat_map(|n| y[(n * 2 + c) * 9..(n * 2 + c + 1) * 9].to_vec())
            .collect();
        let (m, s) = mean_std(&vals);
        assert!(
            m.abs() < 1e-5 && (s - 1.0).abs() < 1e-3,
            "channel {c}: mean {m} std {s}"
        );
    }
    // After many steps the running averages equal the batch statistics (var unbiased), so eval
    // output differs from train output only by the unbiasing factor sqrt((m-1)/m).
    let e = bn.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let f = ((72.0 - 1.0) / 72.0f32).sqrt();
    for (a, b) in e.iter().zip(&y) {
        assert!((a - b * f).abs() < 1e-3, "{a} vs {}", b * f);
    }
    // One sample per channel cannot be normalized in training.
    let err = BatchNorm::d1(3)
        .forward(&Tensor::zeros(&[1, 3], regimen::Device::Cpu), &Ctx::train())
        .unwrap_err();
    assert!(
        err.to_string().contains("more than one value per channel"),
        "{err}"
    );
}

#[test]
fn bad_shapes_name_the_layer_and_both_shapes() {
    let mut rng = Rng::new(0);
    let (mut model, _) = models::by_name("mlp", &mut rng).unwrap();
    let err = model
        .forward(
            &Tensor::zeros(&[2, 1, 10, 10], regimen::Device::Cpu),
            &Ctx::train(),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Shape { .. }));
    assert!(
        msg.contains("1 (Linear(784 -> 512))")
            && msg.contains("[N, 784]")
            && msg.contains("[2, 100]"),
        "{msg}"
    );

    let (mut cnn, _) = models::by_name("cnn", &mut rng).unwrap();
    let msg = cnn
        .forward(
            &Tensor::zeros(&[2, 3, 28, 28], regimen::Device::Cpu),
            &Ctx::eval(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("0 (Conv2d(1 -> 32") && msg.contains("[2, 3, 28, 28]"),
        "{msg}"
    );

    let logits = Tensor::zeros(&[4, 10], regimen::Device::Cpu);
    let msg = CrossEntropy::new()
        .forward(&logits, Target::Hard(&Indices::from_vec(vec![1, 2, 3])))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("4 labels") && msg.contains("[3]"), "{msg}");
    let msg = CrossEntropy::new()
        .forward(&logits, Target::Hard(&Indices::from_vec(vec![1, 2, 3, 10])))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("labels = up to 10") && msg.contains("10 classes"),
        "{msg}"
    );

    let mut lin = Linear::new(3, 2, &mut rng);
    let msg = lin
        .backward(&Tensor::zeros(&[1, 2], regimen::Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("backward called before forward"), "{msg}");
    lin.forward(&Tensor::zeros(&[5, 3], regimen::Device::Cpu), &Ctx::train())
        .unwrap();
    let msg = lin
        .backward(&Tensor::zeros(&[5, 3], regimen::Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("[5, 2]") && msg.contains("[5, 3]"), "{msg}");
}

#[test]
fn summary_counts_parameters_and_flops_like_pytorch() {
    let mut rng = Rng::new(0);
    let (mut cnn, input) = models::by_name("cnn", &mut rng).unwrap();
    let s = cnn.summary(&input).unwrap();
    // sum(p.numel() for p in model.parameters()) of the same PyTorch model.
    assert_eq!(s.total_params(), 870_826);
    assert_eq!(s.rows[0].output, vec![32, 28, 28]);
    assert_eq!(s.rows.last().unwrap().output, vec![10]);
    // First conv: 2 * 9 multiply-adds for each of 32*28*28 outputs.
    assert_eq!(s.rows[0].flops, 2 * 9 * 32 * 28 * 28);
    let (mut mlp, input) = models::by_name("mlp", &mut rng).unwrap();
    assert_eq!(
        mlp.summary(&input).unwrap().total_params(),
        784 * 512 + 512 + 512 * 512 + 512 + 5130
    );
    let text = s.to_string();
    assert!(
        text.contains("Conv2d(1 -> 32, k3x3, s1, p1)") && text.contains("870826 parameters"),
        "{text}"
    );
    let mut names = Vec::new();
    cnn.visit_params("", &mut |n, _| names.push(n.to_string()));
    cnn.visit_buffers("", &mut |n, _| names.push(n.to_string()));
    for want in [
        "0.weight",
        "1.weight",
        "1.bias",
        "16.weight",
        "16.bias",
        "1.running_mean",
        "1.running_var",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
}

/// The lecture's experiment: 10 tanh layers of 500 units on unit-Gaussian input. With
/// `0.01 * randn` the activations collapse toward zero; with `randn` they saturate; with Xavier
/// they keep a healthy spread. Statistics are taken with the forward hook.
#[test]
fn lecture_initialization_experiment() {
    let x = randn(&[500, 500], 7);
    let run = |init: Init| -> Vec<(f64, f64)> {
        let mut rng = Rng::new(11);
        let mut m = Sequential::new();
        for i in 0..10 {
            m = m
                .push_named(
                    &format!("fc{i}"),
                    Linear::new(500, 500, &mut rng)
                        .without_bias()
                        .with_init(init, &mut rng),
                )
                .push_named(&format!("tanh{i}"), tanh());
        }
        let stats = Arc::new(Mutex::new(Vec::new()));
        let s = stats.clone();
        m.set_hook(Box::new(move |name, t| {
            if name.starts_with("tanh") {
                s.lock().unwrap().push(mean_std(&t.to_vec()));
            }
        }));
        m.forward(&x, &Ctx::eval()).unwrap();
        let v = stats.lock().unwrap().clone();
        v
    };
    let small = run(Init::Normal {
        mean: 0.0,
        std: 0.01,
    });
    // Lecture: std 0.213, 0.0476, 0.0106, ... each layer ~0.22x the previous.
    assert!((small[0].1 - 0.213).abs() < 0.01, "{small:?}");
    assert!(small[9].1 < 1e-5, "{small:?}");
    let big = run(Init::Normal {
        mean: 0.0,
        std: 1.0,
    });
    assert!(
        big.iter().all(|&(_, s)| s > 0.95),
        "saturated at +-1: {big:?}"
    );
    // The lecture's "Xavier" is `randn / sqrt(fan_in)`; for these square layers it is also
    // Glorot's `sqrt(2 / (fan_in + fan_out))`. Lecture: 0.628, 0.486, ..., 0.228 for layer 10.
    for (name, init) in [
        ("xavier normal", Init::XavierNormal { gain: 1.0 }),
        ("1/sqrt(fan_in)", Init::LeCunNormal),
    ] {
        let s = run(init);
        assert!(
            (s[0].1 - 0.63).abs() < 0.02 && (s[9].1 - 0.23).abs() < 0.03,
            "{name}: {s:?}"
        );
    }
}

#[test]
fn same_seed_same_training() {
    let train = || {
        let data = regimen::data::digits()
            .unwrap()
            .subset(&(0..200).collect::<Vec<_>>());
        let mut rng = Rng::new(3);
        let mut m = models::mlp(64, &[32], 10, regimen::Unary::Relu, 0.1, &mut rng).unwrap();
        let cfg = regimen::train::SgdConfig {
            epochs: 2,
            batch_size: 16,
            lr: 0.1,
            seed: 5,
            ..Default::default()
        };
        regimen::train::fit_sgd(&mut m, &data, &data, &cfg, |_| {})
            .unwrap()
            .iter()
            .map(|s| (s.train_loss, s.test_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(train(), train());
}

#[test]
fn skipping_the_input_gradient_keeps_parameter_gradients() {
    let grads = |input_grad: bool| {
        let mut rng = Rng::new(8);
        let mut m = Sequential::new()
            .push(Conv2d::new(1, 2, 3, &mut rng).padding(1))
            .push(relu())
            .push(Flatten::new())
            .push(Linear::new(2 * 16, 3, &mut rng));
        let mut mlp = models::mlp(16, &[5], 3, regimen::Unary::Tanh, 0.0, &mut rng).unwrap();
        m.set_input_grad(input_grad);
        mlp.set_input_grad(input_grad);
        let x = randn(&[6, 1, 4, 4], 9);
        let dy = randn(&[6, 3], 10);
        m.forward(&x, &Ctx::train()).unwrap();
        let dx = m.backward(&dy).unwrap();
        mlp.forward(&x, &Ctx::train()).unwrap();
        let dx2 = mlp.backward(&dy).unwrap();
        let mut g = Vec::new();
        m.visit_params("", &mut |_, p| g.extend(p.grad.to_vec()));
        mlp.visit_params("", &mut |_, p| g.extend(p.grad.to_vec()));
        (g, dx.shape().to_vec(), dx2.shape().to_vec())
    };
    let (with, s1, s2) = grads(true);
    let (without, t1, t2) = grads(false);
    assert_eq!(with, without);
    assert_eq!((s1, s2), (vec![6, 1, 4, 4], vec![6, 1, 4, 4]));
    assert_eq!((t1, t2), (vec![0], vec![0]));
}

#[test]
fn training_restores_input_gradients_and_rejects_bad_data() {
    let data = regimen::data::digits()
        .unwrap()
        .subset(&(0..64).collect::<Vec<_>>());
    let mut m = models::mlp(64, &[8], 10, regimen::Unary::Tanh, 0.0, &mut Rng::new(1)).unwrap();
    let cfg = regimen::train::SgdConfig {
        epochs: 1,
        batch_size: 16,
        ..Default::default()
    };
    regimen::train::fit_sgd(&mut m, &data, &data, &cfg, |_| {}).unwrap();
    m.forward(&randn(&[2, 1, 8, 8], 1), &Ctx::train()).unwrap();
    assert_eq!(
        m.backward(&randn(&[2, 10], 2)).unwrap().shape(),
        &[2, 1, 8, 8],
        "dx is back after training"
    );
    let mut bad = data.clone();
    bad.labels[3] = 10;
    let err = regimen::train::fit_sgd(&mut m, &bad, &data, &cfg, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 10 of sample 3"), "{err}");
}

#[test]
fn zero_sized_kernels_are_refused() {
    let x = Tensor::zeros(&[1, 1, 4, 4], regimen::Device::Cpu);
    for mut l in [
        Box::new(MaxPool2d::new(0).stride(1)) as Box<dyn Layer>,
        Box::new(AvgPool2d::new(0).stride(1)),
        Box::new(FractionalMaxPool2d::with_output_size(0, 2, 2)),
        Box::new(Conv2d::new(1, 1, 0, &mut Rng::new(0))),
    ] {
        let err = l.forward(&x, &Ctx::train()).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}

/// With `accumulate`, the micro-batches of one update share the optimizer's step, yet draw
/// their own dropout masks (micro-batch 0 draws what an unaccumulated step draws): N
/// micro-batches are N independent forward passes, as the lecture's dropout wants.
#[test]
fn micro_batches_of_one_update_draw_their_own_masks() {
    use regimen::data::Dataset;
    use regimen::optim::{Optim, OptimConfig, Sgd};
    use regimen::schedule::Constant;
    use regimen::train::{fit, FitConfig};
    let x = Tensor::full(&[32, 64], 1.0, regimen::Device::Cpu);
    let step0 = Indices::from_vec(vec![0]);
    let mut d = Dropout::new(0.5).unwrap();
    let plain = d.forward(&x, &Ctx::train().at_step(&step0)).unwrap();
    let first = d
        .forward(&x, &Ctx::train().at_step(&step0).at_micro(0))
        .unwrap();
    let second = d
        .forward(&x, &Ctx::train().at_step(&step0).at_micro(1))
        .unwrap();
    assert_eq!(plain.to_vec(), first.to_vec());
    assert_ne!(first.to_vec(), second.to_vec());

    // Through the training loop: identical images, so the dropout outputs differ only by
    // their masks; two batches of 8 accumulated into one update.
    let masks = Arc::new(Mutex::new(Vec::new()));
    let h = masks.clone();
    let mut m = Sequential::new()
        .push(Flatten::new())
        .push(Dropout::new(0.5).unwrap())
        .push(Linear::new(16, 10, &mut Rng::new(1)));
    m.set_hook(Box::new(move |name, t| {
        if name == "1" {
            h.lock().unwrap().push(t.to_vec());
        }
    }));
    let data = Dataset {
        images: vec![1.0; 16 * 16],
        labels: (0..16).map(|i| i % 10).collect(),
        image_shape: [1, 4, 4],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    let mut optim = Optim::new(
        Sgd::default(),
        OptimConfig {
            accumulate: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = FitConfig {
        epochs: 1,
        batch_size: 8,
        ..Default::default()
    };
    let test = data.clone();
    fit(
        &mut m,
        Arc::new(data),
        &test,
        &cfg,
        &mut optim,
        &mut Constant(0.1),
        |_| {},
    )
    .unwrap();
    let masks = masks.lock().unwrap();
    assert!(masks.len() >= 2, "{} dropout outputs", masks.len());
    assert_ne!(masks[0], masks[1], "both micro-batches drew the same mask");
    assert_eq!(optim.steps(), 1);
}
