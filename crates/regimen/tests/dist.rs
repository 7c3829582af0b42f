//! The data-parallel machinery in one process (the world of one rank); the runs on several
//! ranks are in the CLI's `tests/distributed.rs`, under `mpirun`.

mod common;

use std::sync::Arc;

use common::randn;
use regimen::dist::{Reducer, Single};
use regimen::layer::{Ctx, Layer};
use regimen::layers::*;
use regimen::loss::CrossEntropy;
use regimen::{models, Indices, Rng, Target, Tensor};

fn grads(model: &mut dyn Layer) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    model.visit_params_unnamed(&mut |p| out.push(p.grad.to_vec()));
    out
}

/// One forward/backward of the digits CNN on a fixed batch; `reduce` runs backward.
fn step(model: &mut Sequential, reduce: &mut dyn FnMut(&mut Sequential, &Tensor)) {
    let x = randn(&[6, 1, 8, 8], 5);
    let y = Indices::from_vec(vec![0, 1, 2, 3, 4, 5]);
    let logits = model.forward(&x, &Ctx::train()).unwrap();
    let out = CrossEntropy::new()
        .forward(&logits, Target::Hard(&y))
        .unwrap();
    reduce(model, &out.grad);
}

/// Backward in parts with the reducer of a one-rank world gives every gradient times the
/// rank's share, in its own place (a wrong mapping from buckets back to parameters, or a
/// gradient reported twice, would show), whatever the bucket size.
#[test]
fn the_reducer_writes_every_gradient_back_in_place() {
    let mut reference = models::digits_cnn(&mut Rng::new(1)).unwrap();
    step(&mut reference, &mut |m, g| drop(m.backward(g).unwrap()));
    let want = grads(&mut reference);
    for bucket in [4usize, 1000, 1 << 20] {
        for share in [1.0f32, 0.25] {
            let mut model = models::digits_cnn(&mut Rng::new(1)).unwrap();
            let mut r = Reducer::new(Arc::new(Single), bucket);
            step(&mut model, &mut |m, g| {
                r.begin(m, share);
                m.backward_in_parts(g, &mut |part| r.ready(part))
                    .expect("a Sequential has parts")
                    .unwrap();
                let extra = r.finish(m, &[3.0, 4.0]).unwrap();
                assert_eq!(extra, vec![3.0, 4.0]);
            });
            let got = grads(&mut model);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let scaled: Vec<f32> = w.iter().map(|v| v * share).collect();
                assert_eq!(g, &scaled, "bucket {bucket}, share {share}");
            }
            // Tiny buckets go one per layer with parameters (and the last, of the extras);
            // a large one holds everything.
            match bucket {
                4 => assert!(r.buckets >= 4, "{} buckets", r.buckets),
                _ if bucket >= 1 << 20 => assert_eq!(r.buckets, 1),
                _ => {}
            }
        }
    }
}

/// Synchronized batch norm in a world of one rank is batch norm: the same output, running
/// statistics, input and parameter gradients (to f32 rounding: the synchronized path sums in
/// f64 on the host).
#[test]
fn synchronized_batch_norm_alone_is_batch_norm() {
    for (shape, make) in [
        (
            vec![5usize, 3, 4, 4],
            BatchNorm::d2 as fn(usize) -> BatchNorm,
        ),
        (vec![7, 3], BatchNorm::d1),
        (vec![4, 3, 6], BatchNorm::d1),
    ] {
        let x = Tensor::from_vec(
            &shape,
            randn(&shape, 9)
                .to_vec()
                .iter()
                .map(|v| 2.0 * v + 1.0)
                .collect(),
        )
        .unwrap();
        let dy = randn(&shape, 10);
        let run = |sync: bool| {
            let mut bn = make(3);
            bn.gamma.value = Tensor::from_vec(&[3], vec![0.5, 1.5, -1.0]).unwrap();
            bn.beta.value = Tensor::from_vec(&[3], vec![0.1, -0.2, 0.3]).unwrap();
            bn.sync_batch_norm(sync);
            let mut outs = Vec::new();
            for _ in 0..2 {
                let y = bn.forward(&x, &Ctx::train()).unwrap();
                let dx = bn.backward(&dy).unwrap();
                outs.push(y.to_vec());
                outs.push(dx.to_vec());
            }
            outs.push(bn.gamma.grad.to_vec());
            outs.push(bn.beta.grad.to_vec());
            outs.push(bn.running_mean.to_vec());
            outs.push(bn.running_var.to_vec());
            let y = bn.forward(&x, &Ctx::eval()).unwrap();
            outs.push(y.to_vec());
            outs
        };
        let (plain, synced) = (run(false), run(true));
        for (i, (a, b)) in plain.iter().zip(&synced).enumerate() {
            for (u, v) in a.iter().zip(b) {
                assert!(
                    (u - v).abs() <= 2e-5 * (1.0 + u.abs()),
                    "{shape:?} output {i}: {u} vs {v}"
                );
            }
        }
    }
}

/// Without a launcher the world is one process, and evaluation is unchanged by sharding.
#[test]
fn the_world_without_a_launcher_is_one_process() {
    if regimen::dist::launched_ranks().is_some() {
        return; // under mpirun or srun: not this test's world
    }
    let w = regimen::dist::init().unwrap();
    assert_eq!((w.rank(), w.size()), (0, 1));
    assert_eq!(w.describe(), "one process");
}
