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
