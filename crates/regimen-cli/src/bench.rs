//! `regimen bench`: training-step throughput of the BENCH.md workloads on synthetic data.
//! Timing protocol (BENCH.md): `warmup` steps, then `reps` repetitions of `steps` steps; the
//! median repetition is reported. A step is forward, softmax cross-entropy, backward and a
//! plain SGD update (lr 0.01), exactly what `bench/pytorch.py` times on its side.

use std::time::Instant;

use anyhow::{bail, Result};
use regimen::layer::{sgd_step, zero_grads, Layer, Mode};
use regimen::loss::CrossEntropy;
use regimen::{models, Device, Indices, Rng, Target, Tensor};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// mlp-step or cnn-step.
    #[arg(long, default_value = "mlp-step")]
    workload: String,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mut rng = Rng::new(0);
    let mut model = match args.workload.as_str() {
        "mlp-step" => models::bench_mlp(&mut rng)?,
        "cnn-step" => models::bench_cnn(&mut rng)?,
        other => bail!("unknown workload {other:?}: expected mlp-step or cnn-step"),
    };
    if args.batch == 0 || args.steps == 0 || args.reps == 0 {
        bail!("--batch, --steps and --reps must be at least 1");
    }
    model.set_input_grad(false); // as PyTorch: the input does not require grad
    let b = args.batch;
    let x: Vec<f32> = (0..b * 784).map(|_| rng.normal() as f32).collect();
    let x = Tensor::from_host(&[b, 1, 28, 28], x, Device::Cpu)?;
    let y = Indices::from_vec((0..b).map(|_| rng.below(10) as u32).collect());
    let ce = CrossEntropy::new();
    let mut step = || -> Result<()> {
        let logits = model.forward(&x, Mode::Train)?;
        let out = ce.forward(&logits, Target::Hard(&y))?;
        model.backward(&out.grad)?;
        sgd_step(&mut model, 0.01);
        zero_grads(&mut model);
        Ok(())
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let mut rates = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let t = Instant::now();
        for _ in 0..args.steps {
            step()?;
        }
        rates.push(args.steps as f64 / t.elapsed().as_secs_f64());
    }
    let mut sorted = rates.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"framework": "regimen", "workload": args.workload, "batch": b, "threads": threads, "steps_per_s": median, "reps": rates})
        );
    } else {
        println!(
            "regimen {} batch {b} threads {threads}: {median:.2} steps/s (reps: {rates:.2?})",
            args.workload
        );
    }
    Ok(())
}
