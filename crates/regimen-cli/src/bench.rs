//! `regimen bench`: training-step throughput of the benchmark workloads (`bench/README.md`) on
//! synthetic data. Timing protocol (`bench/README.md`): `warmup` steps, then `reps` repetitions of `steps` steps; the
//! median repetition is reported. A step is forward, softmax cross-entropy, backward and a
//! plain SGD update (lr 0.01), exactly what `bench/pytorch.py` times on its side.

use std::time::Instant;

use anyhow::{bail, Result};
use regimen::layer::{Ctx, Layer};
use regimen::loss::CrossEntropy;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::{models, Device, Indices, Precision, Rng, Target, Tensor};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// mlp-step, cnn-step, or augment (crop+flip images/s on one core; --batch images per call).
    #[arg(long, default_value = "mlp-step")]
    workload: String,
    /// Images per step (1 to 65,536).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Untimed steps before the timed ones (0 to 10,000).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Steps per timed repetition (1 to 100,000).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Timed repetitions; their median is reported (1 to 1,000).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Also print where a step's time goes: forward and backward time of each layer.
    #[arg(long)]
    profile: bool,
    /// Also print what each GPU operation (kernel, cuBLAS or cuDNN call, copy) takes, over a
    /// few eager steps, each queued behind a hold so that the GPU runs it back to back (GPU
    /// only).
    #[arg(long)]
    kernels: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Record one step as a CUDA graph and time its replays (GPU only).
    #[arg(long)]
    graph: bool,
    /// Matrix products in f32, bf16 or f16 (mixed precision; master weights stay f32; bf16
    /// activations too with bf16).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Under mpirun with several ranks: the gradient buckets' size in MiB (0 sends the whole
    /// gradient as one bucket after backward: no overlap).
    #[arg(long, default_value_t = 1.0)]
    bucket_mb: f64,
}

/// `f32`, `bf16` or `f16`.
pub fn parse_precision(s: &str) -> Result<Precision> {
    Ok(match s {
        "f32" | "fp32" => Precision::F32,
        "bf16" => Precision::Bf16,
        "f16" | "fp16" => Precision::F16,
        other => bail!("invalid --precision {other:?}: expected f32, bf16 or f16"),
    })
}

/// Per-layer forward and backward times over `steps` steps (the step run layer by layer).
fn profile(
    model: &mut regimen::layers::Sequential,
    x: &Tensor,
    y: &Indices,
    steps: usize,
) -> Result<()> {
    let ce = CrossEntropy::new();
    let mut opt = Optim::new(Sgd::default(), OptimConfig::default())?;
    let n = model.len();
    let (mut fwd, mut bwd) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut names = Vec::new();
    let mut other = 0.0;
    // On a GPU, operations are queued: each timed span starts and ends with the device idle.
    let be = x.backend();
    let now = || {
        be.synchronize();
        Instant::now()
    };
    for _ in 0..steps {
        let mut h = x.clone();
        names.clear();
        for (i, (_, layer)) in model.layers_mut().enumerate() {
            let t = now();
            h = layer.forward(&h, &Ctx::train())?;
            fwd[i] += (now() - t).as_secs_f64();
            names.push(layer.describe());
        }
        let t = now();
        let out = ce.forward(&h, Target::Hard(y))?;
        other += (now() - t).as_secs_f64();
        let mut g = out.grad;
        // As Sequential::backward: no backward below the layer where the input's gradient
        // stops being needed.
        let stop = model.backward_stops_at();
        let layers: Vec<_> = model.layers_mut().collect();
        for (i, (_, layer)) in layers.into_iter().enumerate().rev() {
            let t = now();
            g = layer.backward(&g)?;
            bwd[i] += (now() - t).as_secs_f64();
            if stop == Some(i) {
                break;
            }
        }
        let t = now();
        opt.step(model, 0.01)?;
        other += (now() - t).as_secs_f64();
    }
    let total: f64 = fwd.iter().sum::<f64>() + bwd.iter().sum::<f64>() + other;
    say!(
        "{:<4} {:<34} {:>10} {:>10} {:>7}",
        "",
        "layer",
        "fwd ms",
        "bwd ms",
        "share"
    );
    for i in 0..n {
        let (f, b) = (1e3 * fwd[i] / steps as f64, 1e3 * bwd[i] / steps as f64);
        say!(
            "{i:<4} {:<34} {f:>10.2} {b:>10.2} {:>6.1}%",
            names[i],
            100.0 * (fwd[i] + bwd[i]) / total
        );
    }
    say!(
        "{:<4} {:<34} {:>21.2} {:>6.1}%",
        "",
        "loss + SGD update + zero grads",
        1e3 * other / steps as f64,
        100.0 * other / total
    );
    say!(
        "{:<4} {:<34} {:>21.2}",
        "",
        "step total (ms)",
        1e3 * total / steps as f64
    );
    Ok(())
}

/// Steps traced by `--kernels`, and how long the GPU is held while the host queues each.
const TRACED_STEPS: usize = 5;
const TRACE_HOLD_MS: f64 = 250.0;

/// `--kernels`: every GPU operation of [`TRACED_STEPS`] eager steps, by operation and by kernel,
/// against `step_ms`, the timed steps' median (run as `mode`).
fn kernel_table(
    device: Device,
    step_ms: f64,
    mode: &str,
    mut one: impl FnMut() -> Result<()>,
) -> Result<()> {
    let mut ops: Vec<(String, usize, f64)> = Vec::new();
    let mut kernels: Vec<(String, usize, f64)> = Vec::new();
    let add = |rows: &mut Vec<(String, usize, f64)>, key: &str, us: f64| match rows
        .iter_mut()
        .find(|r| r.0 == key)
    {
        Some(r) => {
            r.1 += 1;
            r.2 += us;
        }
        None => rows.push((key.to_string(), 1, us)),
    };
    let mut caveats = Vec::new();
    for _ in 0..TRACED_STEPS {
        let (r, t) = regimen::backend::gpu_kernel_trace(device, TRACE_HOLD_MS, &mut one)?;
        r?;
        let t = t.ok_or_else(|| anyhow::anyhow!("--kernels needs --device cuda"))?;
        caveats.extend(t.caveat());
        for (label, us) in &t.ops {
            add(&mut ops, label, *us);
            add(&mut kernels, &kernel_of(label), *us);
        }
    }
    let n = TRACED_STEPS as f64;
    let busy: f64 = ops.iter().map(|r| r.2).sum::<f64>() / n;
    for (title, rows) in [("operation", &mut ops), ("kernel", &mut kernels)] {
        rows.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
        say!(
            "{:>10} {:>10} {:>10} {:>6}  GPU {title} ({TRACED_STEPS} eager steps, each queued behind a hold)",
            "calls/step",
            "us/step",
            "us/call",
            "share"
        );
        for (name, calls, us) in rows.iter() {
            say!(
                "{:>10.1} {:>10.1} {:>10.2} {:>5.1}%  {name}",
                *calls as f64 / n,
                us / n,
                us / *calls as f64,
                100.0 * us / n / busy.max(1e-9)
            );
        }
    }
    say!(
        "GPU busy {:.3} ms per step (the operations back to back); the timed steps ({mode}) took {step_ms:.3} ms each: {:.3} ms per step was not spent in operations",
        busy / 1e3,
        step_ms - busy / 1e3
    );
    caveats.dedup();
    for c in caveats {
        say!("kernel trace: {c}");
    }
    Ok(())
}

/// The kernel, library call or transfer an operation of a trace belongs to: a label without
/// its launch shape or sizes.
fn kernel_of(label: &str) -> String {
    let cut = |at: &str| label.split(at).next().unwrap_or(label).to_string();
    if label.starts_with("cuBLAS") {
        "cuBLAS gemm".into()
    } else if label.starts_with("cuDNN") {
        cut(" x [")
    } else if label.contains(" [") {
        cut(" [")
    } else {
        label.split(' ').next().unwrap_or(label).to_string()
    }
}

/// Augmentation throughput: crop (pad 2) + flip on one thread, 28x28 grey and 32x32 RGB.
fn augment(args: &BenchArgs) -> Result<()> {
    let pipeline = regimen::data::Pipeline::parse("crop=2,flip")?;
    let mut rows = Vec::new();
    for shape in [[1usize, 28, 28], [3, 32, 32]] {
        let d: usize = shape.iter().product();
        let n = args.batch.max(1);
        let mut rng = Rng::new(0);
        let base: Vec<f32> = (0..n * d).map(|_| rng.next_f64() as f32).collect();
        let labels = vec![0u32; n];
        let mut rates = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            for _ in 0..args.steps {
                let mut images = base.clone();
                pipeline.apply(&mut images, shape, &labels, 10, &mut rng);
                std::hint::black_box(&images);
            }
            rates.push((n * args.steps) as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        rows.push((shape, rates[rates.len() / 2]));
    }
    for (shape, rate) in rows {
        if args.json {
            say!(
                "{}",
                serde_json::json!({"framework": "regimen", "workload": "augment", "pipeline": "crop=2,flip", "shape": shape, "threads": 1, "images_per_s_per_core": rate})
            );
        } else {
            say!("regimen augment crop=2,flip {shape:?}: {rate:.0} images/s on one core");
        }
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    for (flag, v, lo, hi) in [
        ("--batch", args.batch, 1, 65_536),
        ("--warmup", args.warmup, 0, 10_000),
        ("--steps", args.steps, 1, 100_000),
        ("--reps", args.reps, 1, 1_000),
    ] {
        if v < lo || v > hi {
            bail!("invalid {flag} {v}: must be from {lo} to {hi}");
        }
    }
    if args.workload == "augment" {
        return augment(args);
    }
    let precision = parse_precision(&args.precision)?;
    // Under mpirun, a bare `cuda` is one GPU per rank (by local rank), as in training.
    let world = regimen::dist::world();
    let device = regimen::dist::rank_device(&args.device, world.rank(), world.size())?;
    if args.graph && device == Device::Cpu {
        bail!("--graph records a CUDA graph: it needs --device cuda");
    }
    if args.kernels && device == Device::Cpu {
        bail!("--kernels times the operations queued on a GPU: it needs --device cuda");
    }
    let mut rng = Rng::new(0);
    let mut model = match args.workload.as_str() {
        "mlp-step" => models::bench_mlp(&mut rng)?,
        "cnn-step" => models::bench_cnn(&mut rng)?,
        other => bail!("unknown workload {other:?}: expected mlp-step, cnn-step or augment"),
    };
    let summary = model.summary(&[1, 28, 28])?;
    let forward_flops: u64 = summary.rows.iter().map(|r| r.flops).sum();
    if device == Device::Cpu {
        let plan = models::Plan {
            shapes: summary.rows.iter().map(|r| r.output.clone()).collect(),
            params: summary.rows.iter().map(|r| r.params).sum(),
        };
        crate::train_cmd::check_training_memory(
            &format!("--workload {} at --batch {}", args.workload, args.batch),
            &plan,
            [1, 28, 28],
            args.batch,
            "--batch",
        )?;
    }
    model.set_input_grad(false); // as PyTorch: the input does not require grad
    regimen::layer::to_device(&mut model, device);
    let b = args.batch;
    let x: Vec<f32> = (0..b * 784).map(|_| rng.normal() as f32).collect();
    let x = Tensor::from_host(&[b, 1, 28, 28], x, device)?;
    let y = Indices::from_host((0..b).map(|_| rng.below(10) as u32).collect(), device);
    let ce = CrossEntropy::new();
    let mut opt = Optim::new(Sgd::default(), OptimConfig::default())?;
    // The rate lives on the device (a recorded graph reads it there).
    opt.set_lr_table(vec![0.01])?;
    let be = device.backend();
    // Under mpirun: every step sums the gradients over the ranks, as training does.
    let comm = regimen::dist::world();
    let ranks = comm.size();
    if ranks > 1 && args.graph {
        bail!("--graph records one process's step: a data-parallel benchmark runs without it");
    }
    if !(0.0..=1024.0).contains(&args.bucket_mb) {
        bail!(
            "invalid --bucket-mb {}: must be from 0 to 1024",
            args.bucket_mb
        );
    }
    let bucket = if args.bucket_mb == 0.0 {
        usize::MAX
    } else {
        (args.bucket_mb * (1 << 20) as f64) as usize
    };
    let mut reducer = (ranks > 1).then(|| regimen::dist::Reducer::new(comm.clone(), bucket));
    let share = 1.0 / ranks as f32;
    let mut step = |model: &mut regimen::layers::Sequential, opt: &mut Optim| -> Result<()> {
        let logits = {
            let ctx = Ctx::train()
                .at_step(opt.step_counter(device))
                .with_precision(precision)
                .on_rank(comm.rank(), share);
            model.forward(&x, &ctx)?
        };
        let out = ce.forward(&logits, Target::Hard(&y))?;
        match &mut reducer {
            None => drop(model.backward(&out.grad)?),
            Some(r) => drop(r.backward(model, &out.grad, share, &[])?),
        }
        opt.step(model, 0.01)?;
        Ok(())
    };
    for _ in 0..args.warmup.max(usize::from(args.graph)) {
        step(&mut model, &mut opt)?;
    }
    let graph = if args.graph {
        be.begin_capture()?;
        let recorded = step(&mut model, &mut opt);
        let g = be.end_capture();
        recorded?;
        Some(g?)
    } else {
        None
    };
    be.synchronize();
    let mut rates = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let t = Instant::now();
        for _ in 0..args.steps {
            match &graph {
                Some(g) => g.replay()?,
                None => step(&mut model, &mut opt)?,
            }
        }
        be.synchronize();
        rates.push(args.steps as f64 / t.elapsed().as_secs_f64());
    }
    let mut sorted = rates.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    if args.kernels {
        let mode = if args.graph { "graph replay" } else { "eager" };
        kernel_table(device, 1e3 / median, mode, || step(&mut model, &mut opt))?;
    }
    // The cost of the collective alone: one all-reduce of the whole gradient, median of 20.
    let allreduce = if ranks > 1 {
        let n = regimen::layer::param_count(&mut model);
        let r = reducer.as_mut().expect("a reducer on several ranks");
        // The steps' own waiting, read before the all-reduces below add theirs.
        let waited = r.waited.as_secs_f64() * 1e3 / (args.warmup + args.reps * args.steps) as f64;
        let mut times = Vec::new();
        for i in 0..25 {
            let t = Instant::now();
            r.sum_now(&mut model)?;
            if i >= 5 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Some((n * 4, times[times.len() / 2], waited, r.describe()))
    } else {
        None
    };
    if args.profile {
        profile(&mut model, &x, &y, args.steps)?;
        for line in regimen::backend::gpu_conv_plans(device) {
            say!("convolution {line}");
        }
    }
    let threads = rayon::current_num_threads();
    let mode = if args.graph { "graph" } else { "eager" };
    if args.json {
        let mut j = serde_json::json!({"framework": "regimen", "workload": args.workload, "batch": b, "threads": threads, "steps_per_s": median, "reps": rates, "device": device.to_string(), "mode": mode, "precision": args.precision, "forward_flops_per_sample": forward_flops, "cpu_kernels": regimen::backend::cpu_features()});
        if let Some(engine) = regimen::backend::gpu_conv_engine(device) {
            j["gpu_conv"] = engine.into();
        }
        if let Some((bytes, ms, waited, by)) = &allreduce {
            j["ranks"] = ranks.into();
            j["collectives"] = by.as_str().into();
            j["bucket_mb"] = args.bucket_mb.into();
            j["gradient_bytes"] = (*bytes).into();
            j["allreduce_ms"] = (*ms).into();
            j["wait_ms_per_step"] = (*waited).into();
        }
        say!("{j}");
    } else {
        let conv = regimen::backend::gpu_conv_engine(device)
            .filter(|e| !e.ends_with("none"))
            .map(|e| format!(", convolutions by {e}"))
            .unwrap_or_default();
        say!(
            "regimen {} batch {b} device {device} {mode} {}{conv}: {median:.2} steps/s (reps: {rates:.2?})",
            args.workload, args.precision
        );
        if let Some((bytes, ms, waited, by)) = allreduce {
            // NCCL's sums are queued on the GPU's stream: the host never waits for them.
            let wait = if by.starts_with("NCCL") {
                "the sums are queued on the GPU after backward (no host wait)".to_string()
            } else {
                format!(
                    "a step waited {waited:.2} ms for its sums after backward (buckets of {} MiB)",
                    args.bucket_mb
                )
            };
            say!(
                "{ranks} ranks ({by}), batch {b} per rank: one all-reduce of the {:.2} MB gradient takes {ms:.2} ms; {wait}",
                bytes as f64 / 1e6,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kernel_of;

    #[test]
    fn trace_labels_group_by_kernel_call_or_transfer() {
        for (label, kernel) in [
            ("bn_apply [4x32x1]x256", "bn_apply"),
            ("conv_ig_fwd_tf32_m32 [98x2x1]x128", "conv_ig_fwd_tf32_m32"),
            ("cuBLAS NT m512 n784 k128 f32", "cuBLAS gemm"),
            (
                "cuDNN weight gradient x [128, 32, 28, 28] * w [32, 32, 3, 3] stride 1 pad 1",
                "cuDNN weight gradient",
            ),
            ("copy 12 KiB", "copy"),
            ("fill 512 x f32", "fill"),
        ] {
            assert_eq!(kernel_of(label), kernel, "{label}");
        }
    }
}
