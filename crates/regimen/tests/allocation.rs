//! A steady-state training step allocates nothing new: every buffer it needs comes back from
//! the backend's pool. One test in its own binary, so that no other test allocates from the
//! same pool meanwhile.

use regimen::layer::{Ctx, Layer};
use regimen::loss::CrossEntropy;
use regimen::optim::{Adam, Optim, OptimConfig};
use regimen::{models, Device, Indices, Rng, Target, Tensor};

#[test]
fn steady_state_steps_allocate_no_new_buffers() {
    let be = Device::Cpu.backend();
    let mut rng = Rng::new(0);
    for (name, mut model) in [
        ("mlp-step", models::bench_mlp(&mut rng).unwrap()),
        ("cnn-step", models::bench_cnn(&mut rng).unwrap()),
    ] {
        let x = Tensor::from_vec(
            &[8, 1, 28, 28],
            (0..8 * 784).map(|_| rng.normal() as f32).collect(),
        )
        .unwrap();
        let y = Indices::from_vec((0..8).map(|i| i % 10).collect());
        let mut opt = Optim::new(
            Adam::adamw(),
            OptimConfig {
                weight_decay: 0.01,
                clip_norm: Some(1.0),
                ..Default::default()
            },
        )
        .unwrap();
        let ce = CrossEntropy::with_label_smoothing(0.1).unwrap();
        let mut loss_sum = Tensor::zeros(&[1], Device::Cpu);
        let mut step = |model: &mut regimen::layers::Sequential| {
            let logits = {
                let ctx = Ctx::train().at_step(opt.step_counter(Device::Cpu));
                model.forward(&x, &ctx).unwrap()
            };
            let out = ce.forward(&logits, Target::Hard(&y)).unwrap();
            model.backward(&out.grad).unwrap();
            opt.step(model, 1e-3).unwrap();
            be.axpy(1.0, &out.loss, &mut loss_sum);
        };
        for _ in 0..3 {
            step(&mut model);
        }
        let before = be.pool_stats();
        for _ in 0..5 {
            step(&mut model);
        }
        let after = be.pool_stats();
        assert_eq!(
            after.fresh,
            before.fresh,
            "{name}: {} new buffers in 5 steady-state steps",
            after.fresh - before.fresh
        );
        assert!(
            after.reused > before.reused,
            "{name}: the steps did use the pool"
        );
    }
}
