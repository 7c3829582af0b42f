//! The engine's contracts: a training step reads nothing from the device (strict mode);
//! gradients accumulate with `+=` in every layer; an evaluation forward caches nothing;
//! reduced precision round-trips and trains close to f32; max pooling propagates NaN; failed
//! loads change nothing; a run saved and resumed equals the uninterrupted run bit for bit.

mod common;

use std::sync::Arc;

use common::randn;
use regimen::backend::strict;
use regimen::layer::{Ctx, Layer, Precision};
use regimen::layers::*;
use regimen::loss::CrossEntropy;
use regimen::optim::{Adagrad, Adam, Optim, OptimConfig, Optimizer, RmsProp, Sgd};
use regimen::schedule::{Constant, ReduceOnPlateau, Schedule};
use regimen::train::{fit, FitConfig};
use regimen::{models, DType, Device, Error, Indices, Rng, RunState, Target, Tensor};

/// A small residual CNN with stochastic depth, batch norm and dropout: every random and
/// stateful layer in one model.
fn residual_model(rng: &mut Rng) -> Sequential {
    let block = Sequential::new()
        .push(Conv2d::new(8, 8, 3, rng).padding(1).without_bias())
        .push(BatchNorm::d2(8))
        .push(relu());
    Sequential::new()
        .push(Conv2d::new(1, 8, 3, rng).padding(1))
        .push(Residual::new(block).stochastic_depth(0.3).unwrap())
        .push(MaxPool2d::new(2))
        .push(Dropout::new(0.2).unwrap())
        .push(Flatten::new())
        .push(Linear::new(8 * 14 * 14, 10, rng))
}

type MakeOptim = Box<dyn Fn() -> Optim>;

fn optimizers() -> Vec<(&'static str, MakeOptim)> {
    let cfg = || OptimConfig {
        weight_decay: 1e-4,
        clip_norm: Some(1.0),
        clip_value: Some(5.0),
        ..Default::default()
    };
    fn make(o: impl Optimizer + 'static, cfg: OptimConfig) -> Optim {
        Optim::new(o, cfg).unwrap()
    }
    vec![
        ("sgd", Box::new(move || make(Sgd::default(), cfg()))),
        (
            "nesterov",
            Box::new(move || make(Sgd::nesterov(0.9), cfg())),
        ),
        ("adagrad", Box::new(move || make(Adagrad::default(), cfg()))),
        (
            "rmsprop",
            Box::new(move || {
                make(
                    RmsProp {
                        momentum: 0.5,
                        centered: true,
                        ..Default::default()
                    },
                    cfg(),
                )
            }),
        ),
        ("adamw", Box::new(move || make(Adam::adamw(), cfg()))),
    ]
}

#[test]
fn training_steps_read_nothing_from_the_device() {
    let mut rng = Rng::new(1);
    let models: Vec<(&str, Sequential)> = vec![
        ("mlp-step", models::bench_mlp(&mut rng).unwrap()),
        ("cnn-step", models::bench_cnn(&mut rng).unwrap()),
        ("residual", residual_model(&mut rng)),
    ];
    let x = randn(&[4, 1, 28, 28], 2);
    let y = Indices::from_vec(vec![1, 5, 0, 9]);
    let ce = CrossEntropy::with_label_smoothing(0.1).unwrap();
    for (name, mut model) in models {
        for (oname, make) in optimizers() {
            let mut opt = make();
            let be = x.backend();
            let mut loss_sum = Tensor::zeros(&[1], Device::Cpu);
            let reads_before = strict::host_reads();
            strict::set_strict(true);
            for _ in 0..3 {
                let logits = {
                    let ctx = Ctx::train().at_step(opt.step_counter(Device::Cpu));
                    model.forward(&x, &ctx).unwrap()
                };
                let out = ce.forward(&logits, Target::Hard(&y)).unwrap();
                model.backward(&out.grad).unwrap();
                opt.step(&mut model, 0.01).unwrap();
                be.axpy(1.0, &out.loss, &mut loss_sum);
            }
            strict::set_strict(false);
            assert_eq!(
                strict::host_reads(),
                reads_before,
                "{name} + {oname}: host reads in a step"
            );
            // The epoch's one metric read.
            let total = loss_sum.item();
            assert!(total.is_finite(), "{name} + {oname}: loss {total}");
            assert_eq!(strict::host_reads(), reads_before + 1);
        }
    }
}

#[test]
#[should_panic(expected = "host read")]
fn strict_mode_refuses_a_host_read() {
    let t = Tensor::zeros(&[2], Device::Cpu);
    strict::set_strict(true);
    let _ = t.to_vec();
}

/// Every layer with parameters: forward once, backward twice with the same `dy`: the
/// parameter gradients are exactly twice those of one backward.
#[test]
fn every_layer_accumulates_parameter_gradients() {
    let mut rng = Rng::new(4);
    let cases: Vec<(&str, Box<dyn Layer>, Vec<usize>)> = vec![
        ("linear", Box::new(Linear::new(6, 4, &mut rng)), vec![3, 6]),
        (
            "conv2d",
            Box::new(Conv2d::new(2, 3, 3, &mut rng).padding(1)),
            vec![2, 2, 5, 5],
        ),
        ("batchnorm1d", Box::new(BatchNorm::d1(6)), vec![5, 6]),
        ("batchnorm2d", Box::new(BatchNorm::d2(2)), vec![3, 2, 4, 4]),
        ("prelu", Box::new(PReLU::new(2)), vec![3, 2, 4]),
        ("swish", Box::new(Swish::learned(1.3)), vec![3, 5]),
        (
            "maxout",
            Box::new(Maxout::new(6, 4, 3, &mut rng).unwrap()),
            vec![3, 6],
        ),
        (
            "residual",
            Box::new(
                Residual::new(Linear::new(6, 6, &mut rng))
                    .with_shortcut(Linear::new(6, 6, &mut rng)),
            ),
            vec![3, 6],
        ),
        (
            "sequential",
            Box::new(
                Sequential::new()
                    .push(Linear::new(6, 5, &mut rng))
                    .push(tanh())
                    .push(Linear::new(5, 2, &mut rng)),
            ),
            vec![3, 6],
        ),
    ];
    for (name, mut layer, shape) in cases {
        let x = randn(&shape, 5);
        let y = layer.forward(&x, &Ctx::train()).unwrap();
        let dy = randn(y.shape(), 6);
        layer.backward(&dy).unwrap();
        let mut once = Vec::new();
        layer.visit_params("", &mut |n, p| once.push((n.to_string(), p.grad.to_vec())));
        layer.backward(&dy).unwrap();
        let mut twice = Vec::new();
        layer.visit_params("", &mut |_, p| twice.push(p.grad.to_vec()));
        assert!(!once.is_empty(), "{name} has parameters");
        for ((pname, a), b) in once.iter().zip(&twice) {
            assert!(
                a.iter().any(|v| *v != 0.0),
                "{name}.{pname}: a zero gradient proves nothing"
            );
            for (i, (x1, x2)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x2 - 2.0 * x1).abs() <= 1e-6 * (1.0 + x1.abs()),
                    "{name}.{pname}[{i}]: {x1} then {x2}, not twice"
                );
            }
        }
    }
}

/// An evaluation forward keeps no activations: backward after it is refused (and keeps none
/// from an earlier training forward either); with `keep_cache` it works.
#[test]
fn evaluation_forwards_cache_nothing() {
    let mut rng = Rng::new(7);
    let mut model = models::bench_cnn(&mut rng).unwrap();
    let x = randn(&[2, 1, 28, 28], 8);
    model.forward(&x, &Ctx::train()).unwrap();
    let y = model.forward(&x, &Ctx::eval()).unwrap();
    let err = model.backward(&randn(y.shape(), 9)).unwrap_err();
    assert!(matches!(err, Error::NoForwardCache { .. }), "{err}");
    let y = model.forward(&x, &Ctx::eval().keep_cache()).unwrap();
    model.backward(&randn(y.shape(), 9)).unwrap();
}

#[test]
fn half_precision_round_trips_and_trains_close_to_f32() {
    // Values exactly representable in bf16 and f16 survive the round trip; others round to
    // nearest even, as half's conversions.
    let exact = vec![1.0f32, -2.5, 0.15625, 1024.0, 0.0];
    for dt in [DType::BF16, DType::F16] {
        let t = Tensor::from_vec(&[5], exact.clone()).unwrap().to_dtype(dt);
        assert_eq!(t.dtype(), dt);
        assert_eq!(t.to_dtype(DType::F32).to_vec(), exact, "{dt}");
    }
    // Small (one thread) and large (parallel chunks, a partial last chunk) conversions, both
    // ways and between the 16-bit types, with a NaN and an infinity.
    for n in [1000, 70_001] {
        let mut v = randn(&[n], 3).to_vec();
        v[7] = f32::NAN;
        v[n - 1] = f32::INFINITY;
        let x = Tensor::from_vec(&[n], v.clone()).unwrap();
        let (b, h) = (x.to_dtype(DType::BF16), x.to_dtype(DType::F16));
        let want_b: Vec<f32> = v
            .iter()
            .map(|a| half::bf16::from_f32(*a).to_f32())
            .collect();
        let want_h: Vec<f32> = v.iter().map(|a| half::f16::from_f32(*a).to_f32()).collect();
        let same = |got: Vec<f32>, want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    g == w || (g.is_nan() && w.is_nan()),
                    "{what} [{i}]: {g} vs {w}"
                );
            }
        };
        same(b.to_dtype(DType::F32).to_vec(), &want_b, "bf16");
        same(h.to_dtype(DType::F32).to_vec(), &want_h, "f16");
        let b_to_h: Vec<f32> = want_b
            .iter()
            .map(|a| half::f16::from_f32(*a).to_f32())
            .collect();
        same(b.to_dtype(DType::F16).to_vec(), &b_to_h, "bf16 -> f16");
    }
    let bits =
        Tensor::from_half_bits(&[2], DType::BF16, vec![0x3F80, 0xC000], Device::Cpu).unwrap();
    assert_eq!(bits.to_vec(), vec![1.0, -2.0]);
    // Ten MLP steps in bf16 products stay close to the f32 run (bf16 has 8 bits of mantissa).
    let run = |p: Precision| {
        let mut model = models::bench_mlp(&mut Rng::new(0)).unwrap();
        let mut opt = Optim::new(Sgd::momentum(0.9), OptimConfig::default()).unwrap();
        let x = randn(&[32, 1, 28, 28], 1);
        let y = Indices::from_vec((0..32).map(|i| i % 10).collect());
        let mut losses = Vec::new();
        for _ in 0..10 {
            let logits = {
                let ctx = Ctx::train()
                    .at_step(opt.step_counter(Device::Cpu))
                    .with_precision(p);
                model.forward(&x, &ctx).unwrap()
            };
            let out = CrossEntropy::new()
                .forward(&logits, Target::Hard(&y))
                .unwrap();
            model.backward(&out.grad).unwrap();
            opt.step(&mut model, 0.05).unwrap();
            losses.push(out.loss.item());
        }
        losses
    };
    let (f, b) = (run(Precision::F32), run(Precision::Bf16));
    assert!(f[9] < 0.75 * f[0], "f32 learns: {f:?}");
    for (i, (a, c)) in f.iter().zip(&b).enumerate() {
        assert!(
            (a - c).abs() < 0.02 * a.abs().max(0.1),
            "step {i}: f32 {a} vs bf16 {c}"
        );
    }
    assert_ne!(f, b, "bf16 products do round");
}

#[test]
fn max_pooling_propagates_nan() {
    for (k, s) in [(2, 2), (3, 1)] {
        let mut pool = MaxPool2d::new(k).stride(s);
        let mut v = vec![1.0f32; 16];
        v[0] = f32::NAN;
        let x = Tensor::from_vec(&[1, 1, 4, 4], v).unwrap();
        let y = pool.forward(&x, &Ctx::train()).unwrap().to_vec();
        assert!(
            y[0].is_nan(),
            "k{k} s{s}: the window holding a NaN gives NaN: {y:?}"
        );
        assert!(
            y[y.len() - 1] == 1.0,
            "k{k} s{s}: other windows are untouched: {y:?}"
        );
    }
}

#[test]
fn failed_loads_change_nothing() {
    let dir = std::env::temp_dir().join(format!("regimen-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(2);
    let mut small = models::mlp(4, &[3], 2, regimen::Unary::Relu, 0.0, &mut rng).unwrap();
    let other = dir.join("other.safetensors");
    regimen::checkpoint::save(&other, &mut small, None, Default::default()).unwrap();
    // A checkpoint whose first tensors fit and whose last does not.
    let mut model = models::mlp(4, &[3], 5, regimen::Unary::Relu, 0.0, &mut rng).unwrap();
    let mut before = Vec::new();
    model.visit_params("", &mut |_, p| before.push(p.value.to_vec()));
    let err = regimen::checkpoint::load(&other, &mut model).unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
    let mut after = Vec::new();
    model.visit_params("", &mut |_, p| after.push(p.value.to_vec()));
    assert_eq!(
        before, after,
        "a failed checkpoint load left the model as it was"
    );
    // An optimizer state of another optimizer kind.
    let mut opt = Optim::new(Adam::default(), OptimConfig::default()).unwrap();
    let mut sgd = Optim::new(Sgd::momentum(0.9), OptimConfig::default()).unwrap();
    let x = randn(&[2, 4], 1);
    let y = model.forward(&x, &Ctx::train()).unwrap();
    model.backward(&randn(y.shape(), 2)).unwrap();
    sgd.step(&mut model, 0.1).unwrap();
    let path = dir.join("sgd.safetensors");
    sgd.save(&path).unwrap();
    let (t0, m0) = opt.export_state();
    assert!(opt.load(&path).is_err());
    assert_eq!(
        opt.export_state(),
        (t0, m0),
        "a failed optimizer load changed the state"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Train 4 epochs in one go; train 2, save the run state to a file, restore it into a fresh
/// model, optimizer and schedule, train epochs 3 and 4: the same weights and the same metrics,
/// bit for bit (dropout, batch norm, crop and flip augmentation, a schedule that observes).
#[test]
fn a_resumed_run_equals_the_uninterrupted_run() {
    let data = regimen::data::digits().unwrap();
    let (mut train, mut test) = data.split(0.2, 1).unwrap();
    let (mean, std) = train.pixel_mean_std();
    train.normalize(mean, std);
    test.normalize(mean, std);
    let train = Arc::new(train);
    let build = || {
        let mut rng = Rng::new(9);
        let model = Sequential::new()
            .push(Conv2d::new(1, 8, 3, &mut rng).padding(1).without_bias())
            .push(BatchNorm::d2(8))
            .push(relu())
            .push(Dropout::new(0.2).unwrap())
            .push(Flatten::new())
            .push(Linear::new(8 * 64, 10, &mut rng));
        let opt = Optim::new(Sgd::nesterov(0.9), OptimConfig::default()).unwrap();
        let sched = ReduceOnPlateau::new(0.05, 0.5, 0, 0.0, 0, 1e-4);
        (model, opt, sched)
    };
    let cfg = |first_epoch: usize, epochs: usize| FitConfig {
        epochs,
        first_epoch,
        batch_size: 64,
        seed: 11,
        augment: regimen::data::Pipeline::parse("crop=1,flip").unwrap(),
        workers: 0,
        ..Default::default()
    };
    let weights = |m: &mut Sequential| {
        let mut w = Vec::new();
        m.visit_params("", &mut |_, p| w.extend(p.value.to_vec()));
        m.visit_buffers("", &mut |_, b| w.extend(b.to_vec()));
        w
    };
    let strip = |h: Vec<regimen::train::EpochStats>| -> Vec<_> {
        h.into_iter()
            .map(|s| (s.epoch, s.train_loss, s.test_loss, s.test_acc, s.lr))
            .collect()
    };
    let (mut m1, mut o1, mut s1) = build();
    let full = fit(
        &mut m1,
        train.clone(),
        &test,
        &cfg(1, 4),
        &mut o1,
        &mut s1,
        |_| {},
    )
    .unwrap();

    let (mut m2, mut o2, mut s2) = build();
    let first = fit(
        &mut m2,
        train.clone(),
        &test,
        &cfg(1, 2),
        &mut o2,
        &mut s2,
        |_| {},
    )
    .unwrap();
    let path =
        std::env::temp_dir().join(format!("regimen-resume-{}.safetensors", std::process::id()));
    RunState::capture(&mut m2, &o2, &s2, 11, 2)
        .save(&path)
        .unwrap();
    drop((m2, o2, s2));

    let (mut m3, mut o3, mut s3) = build();
    let state = RunState::load(&path).unwrap();
    let pos = state.restore(&mut m3, &mut o3, &mut s3, "resume").unwrap();
    assert_eq!((pos.seed, pos.epochs_done), (11, 2));
    let rest = fit(
        &mut m3,
        train,
        &test,
        &cfg(pos.epochs_done + 1, 4),
        &mut o3,
        &mut s3,
        |_| {},
    )
    .unwrap();
    let mut resumed = first;
    resumed.extend(rest);
    assert_eq!(
        strip(full),
        strip(resumed),
        "the same metrics, epoch by epoch"
    );
    assert_eq!(
        weights(&mut m1),
        weights(&mut m3),
        "the same weights, bit for bit"
    );
    let _ = std::fs::remove_file(path);
    // A state that does not fit another model is refused, and changes nothing.
    let mut other =
        models::mlp(64, &[16], 10, regimen::Unary::Relu, 0.0, &mut Rng::new(1)).unwrap();
    let mut o4 = Optim::new(Sgd::nesterov(0.9), OptimConfig::default()).unwrap();
    let mut s4 = Constant(0.1);
    let before = weights(&mut other);
    assert!(state
        .restore(&mut other, &mut o4, &mut s4, "resume")
        .is_err());
    assert_eq!(before, weights(&mut other));
    assert!(s4.state().is_empty());
    // A damaged state is refused before anything changes, naming the tensor and the element:
    // a NaN weight, a negative running variance, a NaN momentum.
    for (tensor, value, says) in [
        (
            "0.weight",
            f32::NAN,
            "0.weight[2] is NaN (the file is damaged)",
        ),
        (
            "1.running_var",
            -1.0,
            "1.running_var[2] is -1, but a variance cannot be negative",
        ),
        (
            "optim.0.weight.0",
            f32::NAN,
            "0.weight.0[2] is NaN (the file is damaged)",
        ),
    ] {
        let mut bad = RunState {
            tensors: state.tensors.clone(),
            meta: state.meta.clone(),
        };
        bad.tensors.iter_mut().find(|t| t.0 == tensor).unwrap().2[2] = value;
        let (mut m5, mut o5, mut s5) = build();
        let before = weights(&mut m5);
        let err = bad
            .restore(&mut m5, &mut o5, &mut s5, "resume")
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{tensor}: {err}");
        assert_eq!(before, weights(&mut m5), "{tensor}: nothing changed");
    }
}

/// NaN propagates through every layer, as in PyTorch: a NaN in the input makes a NaN in the
/// output (ReLU used to turn it into 0 and hide a diverged model).
#[test]
fn nan_propagates_through_every_layer() {
    let mut rng = Rng::new(3);
    let acts = [
        relu(),
        sigmoid(),
        tanh(),
        leaky_relu(0.1),
        elu(1.0),
        selu(),
        softplus(),
        gelu(),
        mish(),
        swish(1.0),
    ];
    let mut cases: Vec<(String, Box<dyn Layer>, Vec<usize>)> = acts
        .into_iter()
        .map(|a| (a.describe(), Box::new(a) as Box<dyn Layer>, vec![2, 6]))
        .collect();
    cases.extend([
        (
            "linear".to_string(),
            Box::new(Linear::new(6, 4, &mut rng)) as Box<dyn Layer>,
            vec![2, 6],
        ),
        (
            "conv2d".into(),
            Box::new(Conv2d::new(1, 2, 3, &mut rng).padding(1)),
            vec![1, 1, 4, 4],
        ),
        (
            "maxpool".into(),
            Box::new(MaxPool2d::new(2)),
            vec![1, 1, 4, 4],
        ),
        (
            "avgpool".into(),
            Box::new(AvgPool2d::new(2)),
            vec![1, 1, 4, 4],
        ),
        (
            "global avgpool".into(),
            Box::new(GlobalAvgPool::new()),
            vec![1, 1, 4, 4],
        ),
        (
            "fractional maxpool".into(),
            Box::new(FractionalMaxPool2d::with_output_size(2, 3, 3)),
            vec![1, 1, 4, 4],
        ),
        ("batchnorm".into(), Box::new(BatchNorm::d1(6)), vec![2, 6]),
        (
            "dropout".into(),
            Box::new(Dropout::new(0.5).unwrap()),
            vec![2, 6],
        ),
        (
            "maxout".into(),
            Box::new(Maxout::new(6, 2, 2, &mut rng).unwrap()),
            vec![2, 6],
        ),
        ("prelu".into(), Box::new(PReLU::new(1)), vec![2, 6]),
        (
            "learned swish".into(),
            Box::new(Swish::learned(1.0)),
            vec![2, 6],
        ),
        ("softmax".into(), Box::new(Softmax::new()), vec![2, 6]),
        (
            "residual".into(),
            Box::new(Residual::new(Linear::new(6, 6, &mut rng))),
            vec![2, 6],
        ),
        ("flatten".into(), Box::new(Flatten::new()), vec![2, 6]),
    ]);
    for (name, mut layer, shape) in cases {
        let mut v = randn(&shape, 4).to_vec();
        v[0] = f32::NAN;
        let x = Tensor::from_vec(&shape, v).unwrap();
        for ctx in [Ctx::train(), Ctx::eval()] {
            let y = layer.forward(&x, &ctx).unwrap().to_vec();
            assert!(
                y.iter().any(|v| v.is_nan()),
                "{name} ({:?}): NaN in, no NaN out: {y:?}",
                ctx.mode
            );
        }
    }
}

/// Batch norm followed by ReLU (and by a 2x2 max pool), applied in batch norm's own passes
/// (`Sequential`'s fusion), gives the bits of the layers run one after the other: output,
/// running statistics, every gradient, with values on both sides of zero, a NaN in one
/// channel, and planes of even and odd sizes (an odd last row and column are in no window).
#[test]
fn fused_batch_norm_relu_equals_the_two_layers() {
    let build = || {
        let mut rng = Rng::new(11);
        Sequential::new()
            .push(Conv2d::new(2, 3, 3, &mut rng).padding(1))
            .push(BatchNorm::d2(3))
            .push(relu())
            .push(MaxPool2d::new(2))
            .push(Conv2d::new(3, 4, 3, &mut rng).padding(1))
            .push(BatchNorm::d2(4))
            .push(relu())
            .push(Flatten::new())
    };
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_vec()
            .iter()
            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
            .collect()
    };
    for (h, w) in [(6, 6), (7, 5)] {
        for nan in [false, true] {
            let mut x = randn(&[5, 2, h, w], 3).to_vec();
            if nan {
                // Channel 0 of sample 0: inside, and at the last row and column (in no pool
                // window when odd).
                x[7] = f32::NAN;
                x[h * w - 1] = f32::NAN;
            }
            let x = Tensor::from_vec(&[5, 2, h, w], x).unwrap();
            let dy = randn(&[5, 4 * (h / 2) * (w / 2)], 4);
            let run = |fuse: bool| {
                let mut m = build();
                m.set_fusion(fuse);
                // Two steps: the second one's buffers come from the pool, holding the first
                // one's values (a value not written would show).
                m.forward(&x, &Ctx::train()).unwrap();
                m.backward(&dy).unwrap();
                let y = m.forward(&x, &Ctx::train()).unwrap();
                let fused = m.fused_layers();
                let dx = m.backward(&dy).unwrap();
                let mut out = vec![bits(&y), bits(&dx)];
                m.visit_params("", &mut |_, p| out.push(bits(&p.grad)));
                m.visit_buffers("", &mut |_, b| out.push(bits(b)));
                (out, fused)
            };
            let (fused, which) = run(true);
            let (plain, none) = run(false);
            assert_eq!(
                which,
                vec![2, 3, 6],
                "ReLU and pool applied by the first batch norm, the ReLU by the second"
            );
            assert!(none.is_empty());
            assert_eq!(fused.len(), plain.len());
            for (k, (a, b)) in fused.iter().zip(&plain).enumerate() {
                assert_eq!(a, b, "tensor {k} ({h}x{w}, nan input: {nan})");
            }
            if nan {
                assert!(fused[0].contains(&u32::MAX), "the NaN reaches the output");
            }
        }
    }
}

/// A linear layer followed by a ReLU (and a dropout), the sum, the ReLU (and the dropout) in
/// one pass and its backward's mask and bias sums in another (`Backend::bias_relu`,
/// `bias_relu_dropout`), gives the bits of the layers run one after the other: outputs in
/// training and evaluation, every gradient, in f32 and with bf16 products; with and without a
/// bias, a NaN in one sample and a sum of exactly zero (where the ReLU passes no gradient).
#[test]
fn fused_linear_relu_equals_the_two_layers() {
    let build = || {
        let mut rng = Rng::new(12);
        let mut first = Linear::new(6, 40, &mut rng);
        // Unit 1's weights and bias cancel on sample 2 (x there is all ones): sum 0 exactly.
        let mut w = first.weight.value.to_vec();
        w[6..12].copy_from_slice(&[0.5, -0.25, 0.25, -0.5, 1.0, -1.0]);
        first.weight.value = Tensor::from_vec(&[40, 6], w).unwrap();
        let mut b = first.bias.as_ref().unwrap().value.to_vec();
        b[1] = 0.0;
        first.bias.as_mut().unwrap().value = Tensor::from_vec(&[40], b).unwrap();
        let mut m = Sequential::new()
            .push(first)
            .push(relu())
            .push(Dropout::new(0.3).unwrap())
            .push(Linear::new(40, 33, &mut rng).without_bias())
            .push(relu())
            .push(Dropout::new(0.5).unwrap())
            .push(Linear::new(33, 3, &mut rng));
        m.reseed(5);
        m
    };
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_vec()
            .iter()
            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
            .collect()
    };
    for nan in [false, true] {
        let mut x = randn(&[5, 6], 5).to_vec();
        x[12..18].fill(1.0);
        if nan {
            x[26] = f32::NAN;
        }
        let x = Tensor::from_vec(&[5, 6], x).unwrap();
        let dy = randn(&[5, 3], 6);
        for precision in [Precision::F32, Precision::Bf16] {
            let run = |fuse: bool| {
                let mut m = build();
                m.set_fusion(fuse);
                let train = Ctx::train().with_precision(precision);
                m.forward(&x, &train).unwrap();
                m.backward(&dy).unwrap();
                let y = m.forward(&x, &train).unwrap();
                let fused = m.fused_layers();
                let dx = m.backward(&dy).unwrap();
                let eval = m
                    .forward(&x, &Ctx::eval().with_precision(precision))
                    .unwrap();
                let mut out = vec![bits(&y), bits(&dx), bits(&eval)];
                m.visit_params("", &mut |_, p| out.push(bits(&p.grad)));
                (out, fused)
            };
            let (fused, which) = run(true);
            let (plain, none) = run(false);
            assert_eq!(
                which,
                vec![1, 2, 4, 5],
                "the ReLUs and the dropout applied by the linear layers"
            );
            assert!(none.is_empty());
            assert_eq!(fused.len(), plain.len());
            for (k, (a, b)) in fused.iter().zip(&plain).enumerate() {
                assert_eq!(a, b, "tensor {k} (nan input: {nan}, {precision:?})");
            }
            if nan {
                assert!(fused[0].contains(&u32::MAX), "the NaN reaches the output");
            }
        }
    }
}

/// Records the element type of each input it sees; the identity otherwise.
struct Probe {
    half: bool,
    seen: Arc<std::sync::Mutex<Vec<DType>>>,
}

impl Layer for Probe {
    fn describe(&self) -> String {
        "Probe".into()
    }
    fn output_shape(&self, input: &[usize]) -> regimen::Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, _ctx: &Ctx) -> regimen::Result<Tensor> {
        self.seen.lock().unwrap().push(x.dtype());
        Ok(x.clone())
    }
    fn backward(&mut self, dy: &Tensor) -> regimen::Result<Tensor> {
        Ok(dy.clone())
    }
    fn takes_half(&self) -> bool {
        self.half
    }
}

/// bf16 activations: under `Precision::Bf16` a linear layer with a ReLU (and dropout) in its
/// pass hands on a bf16 tensor, holding values that bf16 represents; a layer that takes one
/// gets it as it is, any other gets f32; a Sequential's output is f32. Under f32 and f16
/// every activation is f32.
#[test]
fn bf16_activations_go_to_the_layers_that_take_them() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = |half| Probe {
        half,
        seen: seen.clone(),
    };
    let mut rng = Rng::new(3);
    let mut m = Sequential::new()
        .push(Linear::new(6, 20, &mut rng))
        .push(relu())
        .push(Dropout::new(0.25).unwrap())
        .push(probe(true))
        .push(Linear::new(20, 12, &mut rng))
        .push(relu())
        .push(probe(false))
        .push(Linear::new(12, 3, &mut rng));
    let x = randn(&[4, 6], 8);
    let dy = randn(&[4, 3], 9);
    for (precision, half) in [
        (Precision::Bf16, DType::BF16),
        (Precision::F32, DType::F32),
        (Precision::F16, DType::F32),
    ] {
        for ctx in [Ctx::train(), Ctx::eval()] {
            seen.lock().unwrap().clear();
            let ctx = ctx.with_precision(precision);
            let y = m.forward(&x, &ctx).unwrap();
            assert_eq!(m.fused_layers(), vec![1, 2, 5], "{precision:?}");
            assert_eq!(y.dtype(), DType::F32, "{precision:?}: the output");
            assert_eq!(
                *seen.lock().unwrap(),
                vec![half, DType::F32],
                "{precision:?}: what the probes saw"
            );
            if ctx.mode == regimen::layer::Mode::Train {
                let dx = m.backward(&dy).unwrap();
                assert_eq!(dx.dtype(), DType::F32);
                assert!(dx.to_vec().iter().all(|v| v.is_finite()));
            }
        }
    }
    // The handed-on values are bf16 values: rounding them again changes nothing.
    let mut h = Sequential::new()
        .push(Linear::new(6, 20, &mut rng))
        .push(relu());
    let a = h
        .forward(&x, &Ctx::train().with_precision(Precision::Bf16))
        .unwrap();
    let v = a.to_vec();
    let again = a.to_dtype(DType::BF16).to_vec();
    assert_eq!(v, again);
    assert!(v.iter().filter(|v| **v > 0.0).count() > 20, "{v:?}");
    assert!(!v.iter().any(|v| v.to_bits() & 0xffff != 0));
}

/// bf16 activations through the CNN's blocks: under `Precision::Bf16` a convolution hands
/// batch norm a bf16 tensor, batch norm with its ReLU and pool hands a dropout one, the
/// dropout hands the next convolution one, and the results stay within bf16's rounding of the
/// f32 model's.
#[test]
fn bf16_activations_through_convolutions_and_batch_norm() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let build = || {
        let probe = |half| Probe {
            half,
            seen: seen.clone(),
        };
        let mut rng = Rng::new(4);
        Sequential::new()
            .push(Conv2d::new(2, 4, 3, &mut rng).padding(1).without_bias())
            .push(probe(true))
            .push(BatchNorm::d2(4))
            .push(relu())
            .push(MaxPool2d::new(2))
            .push(Dropout::new(0.25).unwrap())
            .push(probe(true))
            .push(Conv2d::new(4, 3, 3, &mut rng).padding(1))
            .push(probe(false))
    };
    let x = randn(&[3, 2, 6, 6], 10);
    let dy = randn(&[3, 3, 3, 3], 11);
    let mut results = Vec::new();
    for (precision, half) in [(Precision::Bf16, DType::BF16), (Precision::F32, DType::F32)] {
        let mut m = build();
        seen.lock().unwrap().clear();
        let ctx = Ctx::train().with_precision(precision);
        let y = m.forward(&x, &ctx).unwrap();
        assert_eq!(m.fused_layers(), vec![3, 4], "{precision:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![half, half, DType::F32],
            "{precision:?}: what the probes saw in training"
        );
        let dx = m.backward(&dy).unwrap();
        assert_eq!((y.dtype(), dx.dtype()), (DType::F32, DType::F32));
        let mut grads = Vec::new();
        m.visit_params("", &mut |_, p| grads.extend(p.grad.to_vec()));
        // Evaluation: batch norm hands on bf16; the ReLU and the pool (not fused in
        // evaluation) take f32.
        seen.lock().unwrap().clear();
        m.forward(&x, &Ctx::eval().with_precision(precision))
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![half, DType::F32, DType::F32],
            "{precision:?}: what the probes saw in evaluation"
        );
        results.push((y.to_vec(), dx.to_vec(), grads));
    }
    // Within 2% of f32 (measured 0.25-0.39%), by the norm of the difference: a pool's
    // arg-max that rounding flips moves one window's gradient from one element to another,
    // which a largest-difference test would take for an error.
    let ((yb, dxb, gb), (yf, dxf, gf)) = (&results[0], &results[1]);
    for (what, b, f) in [("y", yb, yf), ("dx", dxb, dxf), ("grads", gb, gf)] {
        let norm =
            |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff = norm(&mut b.iter().zip(f).map(|(b, f)| b - f));
        let size = norm(&mut f.iter().copied());
        assert!(
            diff <= 0.02 * size,
            "{what}: bf16 {diff} from f32 (norm {size})"
        );
        assert!(diff > 0.0, "{what}: bf16 rounding shows");
    }
}

/// Residual blocks under bf16 activations: a block whose shortcut is a bare 1x1 convolution
/// (the resnet's stride-2 blocks) gets bf16 from it and from its branch, and sums in f32;
/// training and evaluation of `resnet` (with stochastic depth) run, and the loss, the logits
/// and the parameter gradients stay near the f32 model's. (Not the input gradient: rounding
/// the input alone to bf16, in f32, moves it by 18% of its largest value in this small model,
/// as the pools' arg-max and the ReLUs' masks flip.)
#[test]
fn bf16_activations_through_residual_blocks() {
    let x = randn(&[8, 1, 8, 8], 12);
    let labels = Indices::from_vec((0..8).map(|i| i % 4).collect());
    let mut out = Vec::new();
    for precision in [Precision::Bf16, Precision::F32] {
        let mut m = models::for_input("resnet:1:8:0.2", [1, 8, 8], 4, &mut Rng::new(5)).unwrap();
        let ctx = Ctx::train().with_precision(precision);
        let logits = m.forward(&x, &ctx).unwrap();
        let l = CrossEntropy::new()
            .forward(&logits, Target::Hard(&labels))
            .unwrap();
        let dx = m.backward(&l.grad).unwrap();
        assert_eq!(dx.dtype(), DType::F32);
        let mut grads = Vec::new();
        m.visit_params("", &mut |_, p| grads.extend(p.grad.to_vec()));
        let eval = m
            .forward(&x, &Ctx::eval().with_precision(precision))
            .unwrap();
        assert_eq!(eval.dtype(), DType::F32);
        out.push((l.loss.item(), logits.to_vec(), grads));
    }
    let ((lb, yb, gb), (lf, yf, gf)) = (&out[0], &out[1]);
    assert!(
        (lb - lf).abs() <= 0.02 * lf.abs(),
        "loss bf16 {lb} vs f32 {lf}"
    );
    let scale = yf.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = yb
        .iter()
        .zip(yf)
        .fold(0f32, |m, (b, f)| m.max((b - f).abs()));
    assert!(
        worst <= 0.03 * scale,
        "logits: bf16 {worst} from f32 (largest {scale})"
    );
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = norm(&mut gb.iter().zip(gf).map(|(b, f)| b - f));
    let size = norm(&mut gf.iter().copied());
    // (Rounding only the input to bf16, in f32, moves them by 3.4% of their norm; bf16
    // everywhere by 5.0%. A wrong sum or statistic moves them by their whole size.)
    assert!(
        diff <= 0.1 * size,
        "parameter gradients: bf16 {diff} from f32 (norm {size})"
    );
}
