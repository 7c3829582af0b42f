//! Optimizers: trajectories against `torch.optim` (fixtures from `tools/golden_optim.py`),
//! save/load/resume bit for bit, Nesterov's two forms, validation, clipping, accumulation,
//! weight decay defaults, and the lecture's behaviours on an ill-conditioned quadratic and a
//! saddle point.

mod common;

use std::collections::HashMap;

use common::{assert_close, Fixture};
use regimen::layer::{Ctx, Layer};
use regimen::layers::{tanh, Linear, Sequential};
use regimen::loss::CrossEntropy;
use regimen::optim::*;
use regimen::{Indices, Rng, Target};

fn net() -> Sequential {
    let rng = &mut Rng::new(0);
    Sequential::new()
        .push(Linear::new(4, 3, rng))
        .push(tanh())
        .push(Linear::new(3, 2, rng))
}

#[allow(clippy::type_complexity)]
fn optimizer_of(
    meta: &HashMap<String, String>,
) -> (
    Box<dyn FnOnce(OptimConfig) -> regimen::Result<Optim>>,
    f32,
    f32,
) {
    let f = |k: &str| -> f64 { meta[k].parse().unwrap() };
    let b = |k: &str| meta[k] == "true";
    let (lr, wd) = (f("lr") as f32, f("weight_decay") as f32);
    let make: Box<dyn FnOnce(OptimConfig) -> regimen::Result<Optim>> =
        match meta["optimizer"].as_str() {
            "sgd" => {
                let o = Sgd {
                    momentum: f("momentum"),
                    dampening: f("dampening"),
                    nesterov: b("nesterov"),
                };
                Box::new(move |c| Optim::new(o, c))
            }
            "adagrad" => {
                let o = Adagrad {
                    lr_decay: f("lr_decay"),
                    eps: f("eps"),
                    initial_accumulator_value: f("initial_accumulator_value"),
                };
                Box::new(move |c| Optim::new(o, c))
            }
            "rmsprop" => {
                let o = RmsProp {
                    alpha: f("alpha"),
                    eps: f("eps"),
                    momentum: f("momentum"),
                    centered: b("centered"),
                };
                Box::new(move |c| Optim::new(o, c))
            }
            kind @ ("adam" | "adamw") => {
                let o = Adam {
                    beta1: f("beta1"),
                    beta2: f("beta2"),
                    eps: f("eps"),
                    amsgrad: b("amsgrad"),
                    decoupled: kind == "adamw",
                };
                Box::new(move |c| Optim::new(o, c))
            }
            other => panic!("unknown optimizer {other}"),
        };
    (make, lr, wd)
}

/// Float32 tolerance of the trajectories. One case is ill-conditioned: centered RMSprop with
/// momentum amplifies rounding, so that PyTorch's own float32 and float64 runs of it differ by
/// 2.3e-5 after 20 steps; it gets 2e-5.
fn tolerance(case: &str) -> f32 {
    if case.starts_with("rmsprop_centered_momentum") {
        2e-5
    } else {
        2e-6
    }
}

fn check_trajectory(case: &str) {
    let fx = Fixture::load(&format!("optim/{case}"));
    let (make, lr, wd) = optimizer_of(&fx.meta);
    // Default groups: weight decay on weights only, as the fixture's PyTorch groups.
    let mut opt = make(OptimConfig {
        weight_decay: wd,
        ..Default::default()
    })
    .unwrap();
    let mut model = net();
    model.visit_params("", &mut |name, p| {
        p.value = fx.tensor(&format!("p0.{name}"))
    });
    model.set_input_grad(false);
    let x = fx.tensor("x");
    let labels = Indices::from_vec(
        fx.tensor("labels")
            .to_vec()
            .iter()
            .map(|&v| v as u32)
            .collect(),
    );
    for step in 1..=20 {
        let logits = model.forward(&x, &Ctx::train()).unwrap();
        let out = CrossEntropy::new()
            .forward(&logits, Target::Hard(&labels))
            .unwrap();
        model.backward(&out.grad).unwrap();
        assert!(opt.step(&mut model, lr).unwrap().applied);
        if step == 1 || step == 20 {
            model.visit_params("", &mut |name, p| {
                assert_close(
                    &format!("{case} step {step} {name}"),
                    &p.value,
                    &fx.tensor(&format!("p{step}.{name}")),
                    tolerance(case),
                    tolerance(case),
                );
            });
        }
    }
}

macro_rules! trajectories {
    ($($test:ident => $case:literal),* $(,)?) => { $(#[test] fn $test() { check_trajectory($case); })* };
}

trajectories! {
    sgd => "sgd_lr0.1",
    sgd_momentum => "sgd_momentum0.9",
    sgd_momentum_dampening => "sgd_momentum0.9_dampening0.1",
    sgd_nesterov => "sgd_nesterov0.9",
    sgd_nesterov_weight_decay => "sgd_nesterov0.9_wd0.01",
    sgd_weight_decay => "sgd_wd0.05",
    adagrad => "adagrad_lr0.1",
    adagrad_lr_decay_weight_decay => "adagrad_lrdecay0.01_wd0.01",
    adagrad_initial_accumulator_eps => "adagrad_init0.1_eps1e-6",
    rmsprop => "rmsprop_lr0.01",
    rmsprop_centered => "rmsprop_centered",
    rmsprop_momentum => "rmsprop_momentum0.9",
    rmsprop_centered_momentum_weight_decay => "rmsprop_centered_momentum0.5_wd0.01",
    rmsprop_alpha_eps => "rmsprop_alpha0.9_eps1e-6",
    adam => "adam_lr0.01",
    adam_betas_eps => "adam_betas0.8_0.95_eps1e-6",
    adam_amsgrad => "adam_amsgrad",
    adam_l2 => "adam_wd0.01",
    adam_amsgrad_l2 => "adam_amsgrad_wd0.01",
    adamw => "adamw_lr0.01_wd0.1",
    adamw_amsgrad => "adamw_amsgrad_wd0.05",
}

/// A bare parameter vector, to optimize functions directly.
struct Point(regimen::Param);

impl Point {
    fn new(v: &[f32]) -> Point {
        Point(regimen::Param::new(
            regimen::Tensor::from_vec(&[v.len()], v.to_vec()).unwrap(),
            regimen::ParamKind::Weight,
        ))
    }
    fn get(&self) -> Vec<f32> {
        self.0.value.to_vec()
    }
    fn set_grad(&mut self, g: Vec<f32>) {
        self.0.grad = regimen::Tensor::from_vec(&[g.len()], g).unwrap();
    }
}

impl Layer for Point {
    fn describe(&self) -> String {
        "Point".into()
    }
    fn output_shape(&self, i: &[usize]) -> regimen::Result<Vec<usize>> {
        Ok(i.to_vec())
    }
    fn forward(&mut self, x: &regimen::Tensor, _: &Ctx) -> regimen::Result<regimen::Tensor> {
        Ok(x.clone())
    }
    fn backward(&mut self, dy: &regimen::Tensor) -> regimen::Result<regimen::Tensor> {
        Ok(dy.clone())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut regimen::Param)) {
        f(&regimen::layer::join(prefix, "p"), &mut self.0);
    }
}

/// Minimize `f` from `start` for `steps` steps; returns the final point.
fn minimize(
    opt: impl Optimizer + 'static,
    lr: f32,
    start: &[f32],
    steps: usize,
    grad: impl Fn(&[f32]) -> Vec<f32>,
) -> Vec<f32> {
    let mut p = Point::new(start);
    let mut o = Optim::new(opt, OptimConfig::default()).unwrap();
    for _ in 0..steps {
        let g = grad(&p.get());
        p.set_grad(g);
        o.step(&mut p, lr).unwrap();
    }
    p.get()
}

#[test]
fn nesterov_equals_the_lecture_lookahead_form() {
    // f(x, y) = 0.5 (x^2 + 10 y^2); the lecture's form evaluates the gradient at theta - gamma v.
    let grad = |p: &[f32]| vec![p[0], 10.0 * p[1]];
    let (gamma, eta) = (0.9f32, 0.02f32);
    let (mut theta, mut v) = (vec![3.0f32, -2.0], vec![0.0f32; 2]);
    let mut p = Point::new(&theta);
    let mut o = Optim::new(Sgd::nesterov(gamma as f64), OptimConfig::default()).unwrap();
    for t in 0..50 {
        let look: Vec<f32> = theta
            .iter()
            .zip(&v)
            .map(|(th, vi)| th - gamma * vi)
            .collect();
        let g = grad(&look);
        for i in 0..2 {
            v[i] = gamma * v[i] + eta * g[i];
            theta[i] -= v[i];
        }
        // regimen's parameters are the lecture's look-ahead point theta - gamma v.
        let g = grad(&p.get());
        p.set_grad(g);
        o.step(&mut p, eta).unwrap();
        let ours = p.get();
        for i in 0..2 {
            let lookahead = theta[i] - gamma * v[i];
            assert!(
                (ours[i] - lookahead).abs() < 1e-5,
                "step {t}: {ours:?} vs look-ahead {lookahead}"
            );
        }
    }
}

#[test]
fn momentum_and_adam_beat_sgd_on_an_ill_conditioned_quadratic() {
    // f = 0.5 (x^2 + 100 y^2): the learning rate is capped by the steep y direction (< 2/100),
    // so plain SGD crawls along x ("poor conditioning", the lecture).
    let f = |p: &[f32]| 0.5 * (p[0] * p[0] + 100.0 * p[1] * p[1]);
    let grad = |p: &[f32]| vec![p[0], 100.0 * p[1]];
    let start = [10.0, 1.0];
    let sgd = f(&minimize(Sgd::default(), 0.01, &start, 100, grad));
    let momentum = f(&minimize(Sgd::momentum(0.9), 0.01, &start, 100, grad));
    let nesterov = f(&minimize(Sgd::nesterov(0.9), 0.01, &start, 100, grad));
    let adam = f(&minimize(Adam::default(), 0.5, &start, 100, grad));
    eprintln!("f after 100 steps: sgd {sgd:.3e}, momentum {momentum:.3e}, nesterov {nesterov:.3e}, adam {adam:.3e}");
    assert!(sgd > 1.0, "SGD is still far: {sgd}");
    assert!(momentum < sgd / 100.0 && nesterov < sgd / 100.0 && adam < sgd / 10.0);
}

#[test]
fn momentum_and_adam_escape_a_saddle_point_sooner() {
    // f = x^2 + y^4/4 - y^2/2 has a saddle at the origin and minima at (0, +-1); starting on
    // the ridge with a tiny y, the gradient along y is tiny (the lecture's "stuck at a saddle").
    let f = |p: &[f32]| p[0] * p[0] + p[1].powi(4) / 4.0 - p[1] * p[1] / 2.0;
    let grad = |p: &[f32]| vec![2.0 * p[0], p[1].powi(3) - p[1]];
    let start = [1.0, 1e-4];
    let sgd = f(&minimize(Sgd::default(), 0.02, &start, 150, grad));
    let momentum = f(&minimize(Sgd::momentum(0.9), 0.02, &start, 150, grad));
    let adam = f(&minimize(Adam::default(), 0.05, &start, 150, grad));
    eprintln!(
        "f after 150 steps: sgd {sgd:.4}, momentum {momentum:.4}, adam {adam:.4} (minimum -0.25)"
    );
    assert!(sgd > -0.01, "SGD has not left the saddle: {sgd}");
    assert!(momentum < -0.2 && adam < -0.2);
}

fn trained(opt: &mut Optim, model: &mut Sequential, steps: usize) {
    let x = common::randn(&[8, 4], 3);
    let labels = Indices::from_vec(vec![0, 1, 1, 0, 1, 0, 0, 1]);
    for _ in 0..steps {
        let logits = model.forward(&x, &Ctx::train()).unwrap();
        let out = CrossEntropy::new()
            .forward(&logits, Target::Hard(&labels))
            .unwrap();
        model.backward(&out.grad).unwrap();
        opt.step(model, 0.01).unwrap();
    }
}

fn params(m: &mut Sequential) -> Vec<Vec<f32>> {
    let mut v = Vec::new();
    m.visit_params("", &mut |_, p| v.push(p.value.to_vec()));
    v
}

/// A damaged optimizer state is refused with the tensor and element named: a non-finite value
/// in any slot, a negative value in a slot of squares (Adam's second moment and its AMSGrad
/// maximum, RMSprop's square average; a momentum or a mean may be negative), the optimizer
/// kind given in words.
#[test]
fn damaged_optimizer_states_are_refused() {
    let adam = || {
        Optim::new(
            Adam {
                amsgrad: true,
                ..Default::default()
            },
            OptimConfig::default(),
        )
        .unwrap()
    };
    let mut model = net();
    let mut opt = adam();
    trained(&mut opt, &mut model, 3);
    let (tensors, meta) = opt.export_state();
    let damaged = |slot: &str, value: f32| {
        let mut t = tensors.clone();
        let e = t.iter_mut().find(|e| e.0.ends_with(slot)).unwrap();
        e.2[1] = value;
        let name = e.0.clone();
        let err = adam()
            .import_state(t, &meta, "s.safetensors")
            .map(|()| String::new())
            .unwrap_or_else(|e| e.to_string());
        (name, err)
    };
    let (name, err) = damaged(".0", -0.5);
    assert_eq!(err, "", "a negative first moment is legal ({name})");
    for slot in [".1", ".2"] {
        let (name, err) = damaged(slot, -0.5);
        assert!(
            err.starts_with("s.safetensors: ")
                && err.contains(&format!("{name}[1] is -0.5"))
                && err.contains("squares"),
            "{err}"
        );
    }
    for slot in [".0", ".1", ".2"] {
        let (name, err) = damaged(slot, f32::NAN);
        assert!(err.contains(&format!("{name}[1] is NaN")), "{err}");
    }
    let mut sgd = Optim::new(Sgd::nesterov(0.9), OptimConfig::default()).unwrap();
    let err = sgd
        .import_state(tensors.clone(), &meta, "s.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimizer state of adam, expected sgd"),
        "{err}"
    );
}

#[test]
fn save_load_then_step_is_bit_for_bit_the_step_without_save() {
    for make in [
        || {
            Optim::new(
                Adam {
                    amsgrad: true,
                    ..Default::default()
                },
                OptimConfig::default(),
            )
        },
        || {
            Optim::new(
                RmsProp {
                    centered: true,
                    momentum: 0.5,
                    ..Default::default()
                },
                OptimConfig::default(),
            )
        },
        || {
            Optim::new(
                Sgd::nesterov(0.9),
                OptimConfig {
                    weight_decay: 0.01,
                    ..Default::default()
                },
            )
        },
    ] {
        let mut opt = make().unwrap();
        let mut model = net();
        trained(&mut opt, &mut model, 5);
        let dir = std::env::temp_dir().join(format!(
            "regimen-optim-{}-{}",
            std::process::id(),
            opt.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.safetensors");
        opt.save(&path).unwrap();
        let snapshot = params(&mut model);
        trained(&mut opt, &mut model, 3);
        let uninterrupted = params(&mut model);

        let mut resumed = make().unwrap();
        resumed.load(&path).unwrap();
        assert_eq!(resumed.steps(), 5);
        let mut model2 = net();
        let mut i = 0;
        model2.visit_params("", &mut |_, p| {
            p.value = regimen::Tensor::from_vec(p.value.shape(), snapshot[i].clone()).unwrap();
            i += 1;
        });
        trained(&mut resumed, &mut model2, 3);
        assert_eq!(
            params(&mut model2),
            uninterrupted,
            "{}: resumed run differs",
            opt.name()
        );
        // Loading another optimizer's state is refused with the file's name.
        let mut other = Optim::new(Adagrad::default(), OptimConfig::default()).unwrap();
        let err = other.load(&path).unwrap_err().to_string();
        assert!(
            err.contains("state.safetensors") && err.contains("expected adagrad"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn hyperparameters_are_validated_with_the_field_and_value() {
    let cases: Vec<(regimen::Result<Optim>, &str)> = vec![
        (
            Optim::new(
                Adam {
                    beta1: 1.0,
                    ..Default::default()
                },
                OptimConfig::default(),
            ),
            "beta1 = 1",
        ),
        (
            Optim::new(
                Adam {
                    beta2: -0.1,
                    ..Default::default()
                },
                OptimConfig::default(),
            ),
            "beta2 = -0.1",
        ),
        (
            Optim::new(
                Adam {
                    eps: 0.0,
                    ..Default::default()
                },
                OptimConfig::default(),
            ),
            "eps = 0",
        ),
        (
            Optim::new(
                RmsProp {
                    alpha: 1.5,
                    ..Default::default()
                },
                OptimConfig::default(),
            ),
            "alpha = 1.5",
        ),
        (
            Optim::new(
                Sgd {
                    momentum: 0.0,
                    nesterov: true,
                    ..Default::default()
                },
                OptimConfig::default(),
            ),
            "nesterov",
        ),
        (
            Optim::new(
                Sgd::default(),
                OptimConfig {
                    weight_decay: -1.0,
                    ..Default::default()
                },
            ),
            "weight_decay = -1",
        ),
        (
            Optim::new(
                Sgd::default(),
                OptimConfig {
                    clip_norm: Some(0.0),
                    ..Default::default()
                },
            ),
            "clip_norm = 0",
        ),
        (
            Optim::new(
                Sgd::default(),
                OptimConfig {
                    accumulate: 0,
                    ..Default::default()
                },
            ),
            "accumulate = 0",
        ),
    ];
    for (r, needle) in cases {
        let err = r.err().expect(needle).to_string();
        assert!(err.contains(needle), "{err} should name {needle}");
    }
    let mut o = Optim::new(Sgd::default(), OptimConfig::default()).unwrap();
    let err = o
        .step(&mut Point::new(&[1.0]), -0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr = -0.1"), "{err}");
}

#[test]
fn clipping_by_norm_and_by_value() {
    // Gradient (3, 4): norm 5. Clipped to norm 1 -> (0.6, 0.8) (times 5/(5+1e-6)).
    let mut p = Point::new(&[0.0, 0.0]);
    let mut o = Optim::new(
        Sgd::default(),
        OptimConfig {
            clip_norm: Some(1.0),
            ..Default::default()
        },
    )
    .unwrap();
    p.set_grad(vec![3.0, 4.0]);
    let info = o.step(&mut p, 1.0).unwrap();
    assert_eq!(info.grad_norm.map(|n| n.item()), Some(5.0));
    let v = p.get();
    assert!(
        (v[0] + 0.6).abs() < 1e-6 && (v[1] + 0.8).abs() < 1e-6,
        "{v:?}"
    );
    // Under the threshold nothing changes.
    p.set_grad(vec![0.3, 0.4]);
    o.step(&mut p, 1.0).unwrap();
    assert!((p.get()[0] + 0.9).abs() < 1e-6);
    let mut p = Point::new(&[0.0, 0.0, 0.0]);
    let mut o = Optim::new(
        Sgd::default(),
        OptimConfig {
            clip_value: Some(0.5),
            ..Default::default()
        },
    )
    .unwrap();
    p.set_grad(vec![3.0, -0.2, -4.0]);
    o.step(&mut p, 1.0).unwrap();
    assert_eq!(p.get(), vec![-0.5, 0.2, 0.5]);
}

#[test]
fn accumulating_two_half_batches_equals_one_batch() {
    let x = common::randn(&[8, 4], 5);
    let labels: Vec<u32> = vec![0, 1, 1, 0, 1, 0, 0, 1];
    let run = |accumulate: usize| {
        let mut model = net();
        let mut opt = Optim::new(
            Sgd::momentum(0.9),
            OptimConfig {
                accumulate,
                ..Default::default()
            },
        )
        .unwrap();
        let xs = x.to_vec();
        for _ in 0..3 {
            let per = 8 / accumulate;
            for k in 0..accumulate {
                let xb = regimen::Tensor::from_vec(
                    &[per, 4],
                    xs[k * per * 4..(k + 1) * per * 4].to_vec(),
                )
                .unwrap();
                let yb = Indices::from_vec(labels[k * per..(k + 1) * per].to_vec());
                let logits = model.forward(&xb, &Ctx::train()).unwrap();
                let out = CrossEntropy::new()
                    .forward(&logits, Target::Hard(&yb))
                    .unwrap();
                model.backward(&out.grad).unwrap();
                let info = opt.step(&mut model, 0.5).unwrap();
                assert_eq!(info.applied, k + 1 == accumulate);
            }
        }
        params(&mut model)
    };
    let (one, two) = (run(1), run(2));
    for (a, b) in one.iter().flatten().zip(two.iter().flatten()) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn weight_decay_skips_biases_and_norm_parameters_by_default_and_groups_override() {
    let mut model = Sequential::new()
        .push(Linear::new(2, 2, &mut Rng::new(1)))
        .push(regimen::layers::BatchNorm::d1(2));
    let before = params(&mut model);
    // Zero gradients: only weight decay moves parameters.
    let mut opt = Optim::new(
        Sgd::default(),
        OptimConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&mut model, 1.0).unwrap();
    let after = params(&mut model);
    for (a, b) in after[0].iter().zip(&before[0]) {
        assert!((a - 0.9 * b).abs() < 1e-7, "weight decayed: {a} vs {b}");
    }
    assert_eq!(
        after[1..],
        before[1..],
        "bias and batch-norm parameters untouched"
    );
    let mut opt = Optim::new(
        Sgd::default(),
        OptimConfig {
            weight_decay: 0.1,
            decay_all: true,
            groups: vec![ParamGroup {
                pattern: "1.".into(),
                lr_scale: 0.0,
                weight_decay: None,
            }],
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&mut model, 1.0).unwrap();
    let again = params(&mut model);
    assert!(
        (again[1][0] - 0.9 * after[1][0]).abs() < 1e-7,
        "decay_all decays the bias"
    );
    assert_eq!(
        again[2..],
        after[2..],
        "lr_scale 0 freezes the batch norm group"
    );
}

#[test]
fn l2_in_the_loss_versus_decoupled_weight_decay() {
    // With SGD, a penalty lambda |w|^2 in the loss is weight decay 2 lambda: same steps.
    let w0 = [0.5f32, -1.5, 2.0];
    let data_grad = |p: &[f32]| p.iter().map(|v| 0.3 * v + 0.1).collect::<Vec<f32>>();
    let lambda = 0.05;
    let penalty = regimen::loss::Penalty::L2 { lambda };
    let mut a = Point::new(&w0);
    let mut b = Point::new(&w0);
    let mut oa = Optim::new(Sgd::momentum(0.5), OptimConfig::default()).unwrap();
    let mut ob = Optim::new(
        Sgd::momentum(0.5),
        OptimConfig {
            weight_decay: 2.0 * lambda,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..10 {
        a.set_grad(data_grad(&a.get()));
        let v = a.0.value.clone();
        penalty.add_grad(&v, &mut a.0.grad);
        oa.step(&mut a, 0.1).unwrap();
        b.set_grad(data_grad(&b.get()));
        ob.step(&mut b, 0.1).unwrap();
    }
    for (x, y) in a.get().iter().zip(b.get()) {
        assert!((x - y).abs() < 1e-6);
    }
    // With Adam they differ: L2's gradient is normalized by sqrt(v) (each step moves ~lr
    // whatever the weight's size), decoupled decay shrinks by exactly (1 - lr wd).
    let (lr, wd) = (0.01f32, 0.1f32);
    let mut l2 = Point::new(&[2.0]);
    let mut dec = Point::new(&[2.0]);
    let mut o_l2 = Optim::new(
        Adam::default(),
        OptimConfig {
            weight_decay: wd,
            ..Default::default()
        },
    )
    .unwrap();
    let mut o_dec = Optim::new(
        Adam::adamw(),
        OptimConfig {
            weight_decay: wd,
            ..Default::default()
        },
    )
    .unwrap();
    l2.set_grad(vec![0.0]);
    dec.set_grad(vec![0.0]);
    o_l2.step(&mut l2, lr).unwrap();
    o_dec.step(&mut dec, lr).unwrap();
    assert!(
        (l2.get()[0] - (2.0 - lr)).abs() < 1e-5,
        "Adam + L2 moves by lr: {:?}",
        l2.get()
    );
    assert!(
        (dec.get()[0] - 2.0 * (1.0 - lr * wd)).abs() < 1e-6,
        "AdamW shrinks by 1 - lr wd: {:?}",
        dec.get()
    );
}
