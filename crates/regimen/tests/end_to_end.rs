//! End to end: an MLP trained with plain mini-batch SGD on the embedded UCI 8x8 digits
//! (1,438 train / 359 held-out images) reaches a stated accuracy on the held-out images.

use regimen::train::{evaluate, fit_sgd, SgdConfig};
use regimen::{models, Rng, Unary};

#[test]
fn mlp_learns_digits_with_sgd() {
    let data = regimen::data::digits().unwrap();
    let (mut train, mut test) = data.split(0.2, 42).unwrap();
    assert_eq!((train.len(), test.len()), (1438, 359));
    let (mean, std) = train.pixel_mean_std();
    train.normalize(mean, std);
    test.normalize(mean, std);
    let mut rng = Rng::new(0);
    let mut model = models::mlp(64, &[128], 10, Unary::Relu, 0.0, &mut rng).unwrap();
    let (_, before) = evaluate(&mut model, &test, 256, regimen::Device::Cpu).unwrap();
    assert!(before < 0.3, "untrained accuracy {before}");
    let cfg = SgdConfig {
        epochs: 15,
        batch_size: 32,
        lr: 0.05,
        seed: 1,
        ..Default::default()
    };
    let history = fit_sgd(&mut model, &train, &test, &cfg, |s| eprintln!("{s:?}")).unwrap();
    let last = history.last().unwrap();
    assert!(
        last.test_acc >= 0.95,
        "held-out accuracy {:.3}",
        last.test_acc
    );
    assert!(
        history[0].train_loss > 2.0 * last.train_loss,
        "the loss falls"
    );
}

/// The on-device training loop (the training set on the device, batches gathered by a
/// kernel) sees the same batches as the host loader: without augmentation both give the same
/// weights bit for bit on the CPU; with crop, Cutout, Mixup, CutMix, rotation and noise it still
/// learns.
#[test]
fn device_batches_equal_host_batches() {
    use regimen::data::Pipeline;
    use regimen::optim::{Optim, OptimConfig, Sgd};
    use regimen::schedule::Constant;
    use regimen::train::{fit, FitConfig};
    use std::sync::Arc;
    let data = regimen::data::digits().unwrap();
    let (mut train, mut test) = data.split(0.2, 42).unwrap();
    let (mean, std) = train.pixel_mean_std();
    train.normalize(mean, std);
    test.normalize(mean, std);
    let train = Arc::new(train);
    let run = |device_data: bool, augment: &str| {
        let mut model = models::for_input("digits-cnn", [1, 8, 8], 10, &mut Rng::new(3)).unwrap();
        let mut optim = Optim::new(Sgd::momentum(0.9), OptimConfig::default()).unwrap();
        let cfg = FitConfig {
            epochs: 8,
            batch_size: 100, // 1,438 samples: a partial last batch too
            seed: 5,
            device_data,
            augment: Pipeline::parse(augment).unwrap(),
            ..Default::default()
        };
        let h = fit(
            &mut model,
            train.clone(),
            &test,
            &cfg,
            &mut optim,
            &mut Constant(0.05),
            |_| {},
        )
        .unwrap();
        let mut w = Vec::new();
        regimen::layer::Layer::visit_params(&mut model, "", &mut |_, p| w.extend(p.value.to_vec()));
        (h, w)
    };
    let (host, wh) = run(false, "none");
    let (dev, wd) = run(true, "none");
    assert_eq!(wh, wd, "the same weights after eight epochs");
    assert_eq!(
        host,
        dev.iter()
            .map(|s| regimen::train::EpochStats {
                seconds: host[s.epoch - 1].seconds,
                ..s.clone()
            })
            .collect::<Vec<_>>()
    );
    // Flips do not suit digits; a one-pixel crop keeps the accuracy close to the plain run's.
    let (aug, _) = run(true, "crop=1");
    let (plain, with_crop) = (dev.last().unwrap().test_acc, aug.last().unwrap().test_acc);
    assert!(
        plain > 0.9 && with_crop > plain - 0.1,
        "plain {plain}, with crop {with_crop}"
    );
    // The batch steps after the gather: Cutout, Mixup, CutMix, rotation and noise on the
    // device. Each run is reproducible, changes the batches, and learns about as well as the
    // host loader's (the mean test accuracy of the last three epochs within 0.1; 8x8 digits
    // suffer from them).
    let tail =
        |h: &[regimen::train::EpochStats]| h[5..].iter().map(|s| s.test_acc).sum::<f32>() / 3.0;
    for spec in [
        "cutout=2",
        "mixup=0.2",
        "cutmix=1.0",
        "rotate=10,noise=0.05",
    ] {
        let (on_device, w1) = run(true, spec);
        let (again, w2) = run(true, spec);
        assert_eq!(w1, w2, "{spec}: the same seed, the same weights");
        assert_eq!(
            on_device,
            again
                .iter()
                .zip(&on_device)
                .map(|(a, b)| regimen::train::EpochStats {
                    seconds: b.seconds,
                    ..a.clone()
                })
                .collect::<Vec<_>>()
        );
        assert_ne!(w1, wd, "{spec}: the step changed the batches");
        let (host, _) = run(false, spec);
        let (d, h) = (tail(&on_device), tail(&host));
        assert!(d > h - 0.1, "{spec}: device {d}, host loader {h}");
        if spec.starts_with("mix") || spec.starts_with("cutmix") {
            // Against mixed labels the training loss stays above the plain run's.
            let (m, p) = (on_device[7].train_loss, dev[7].train_loss);
            assert!(m > p, "{spec}: training loss {m}, plain {p}");
        }
    }
}
