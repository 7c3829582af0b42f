//! `activations`: the lecture's weight-initialization experiment. A 10-layer net of 500 units
//! on 1000 inputs drawn from N(0, 1): per-layer activation mean and std, histograms, the
//! fraction of saturated (tanh, |y| > 0.99) or dead (ReLU, zero on every input) units, and the
//! per-layer weight-gradient norms of one backward pass (of a random output gradient).

use std::sync::{Arc, Mutex};

use anyhow::Result;
use regimen::layer::{Ctx, Layer};
use regimen::layers::{Activation, Linear, Sequential};
use regimen::{Init, Rng, Tensor, Unary};

use super::report::Report;
use crate::plot::{self, Plot, Series};

/// One configuration of the experiment.
pub struct Config {
    pub name: &'static str,
    pub activation: Unary,
    pub init: Init,
}

pub fn configs() -> Vec<Config> {
    vec![
        Config {
            name: "tanh, W ~ N(0, 0.01^2)",
            activation: Unary::Tanh,
            init: Init::Normal {
                mean: 0.0,
                std: 0.01,
            },
        },
        Config {
            name: "tanh, W ~ N(0, 1)",
            activation: Unary::Tanh,
            init: Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        },
        Config {
            name: "tanh, Xavier",
            activation: Unary::Tanh,
            init: Init::LeCunNormal,
        },
        Config {
            name: "ReLU, Xavier",
            activation: Unary::Relu,
            init: Init::LeCunNormal,
        },
        Config {
            name: "ReLU, He",
            activation: Unary::Relu,
            init: Init::KaimingNormal {
                a: 0.0,
                fan: regimen::Fan::In,
            },
        },
    ]
}

/// Per hidden layer: activation statistics and the weight gradient's norm.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub mean: f64,
    pub std: f64,
    /// tanh: |y| > 0.99; ReLU: units that are zero for every input.
    pub saturated_or_dead: f64,
    pub grad_norm: f64,
    /// A sample of the activations, for histograms.
    pub sample: Vec<f32>,
}

/// Run one configuration: `layers` hidden layers of `width` units on `n` inputs.
pub fn run(
    c: &Config,
    layers: usize,
    width: usize,
    n: usize,
    seed: u64,
) -> Result<Vec<LayerStats>> {
    let mut rng = Rng::new(seed);
    let mut m = Sequential::new();
    for _ in 0..layers {
        // The lecture's W = init(fan_in, fan_out), no bias.
        m = m
            .push(
                Linear::new(width, width, &mut rng)
                    .without_bias()
                    .with_init(c.init, &mut rng),
            )
            .push(Activation::new(c.activation));
    }
    let x: Vec<f32> = (0..n * width).map(|_| rng.normal() as f32).collect();
    let x = Tensor::from_vec(&[n, width], x)?;
    let outputs: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
    {
        let o = outputs.clone();
        m.set_hook(Box::new(move |name, t| {
            // Odd positions are the activations.
            if name.parse::<usize>().is_ok_and(|i| i % 2 == 1) {
                o.lock().expect("not poisoned").push(t.to_vec());
            }
        }));
    }
    let y = m.forward(&x, &Ctx::train())?;
    m.clear_hook();
    let dy: Vec<f32> = (0..y.numel()).map(|_| rng.normal() as f32).collect();
    m.backward(&Tensor::from_vec(y.shape(), dy)?)?;
    let mut grads = Vec::new();
    m.visit_params("", &mut |_, p| {
        grads.push(
            p.grad
                .to_vec()
                .iter()
                .map(|&g| (g as f64) * (g as f64))
                .sum::<f64>()
                .sqrt(),
        )
    });
    let outs = outputs.lock().expect("not poisoned").clone();
    Ok(outs
        .into_iter()
        .zip(grads)
        .map(|(a, grad_norm)| {
            let k = a.len() as f64;
            let mean = a.iter().map(|&v| v as f64).sum::<f64>() / k;
            let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / k).sqrt();
            let saturated_or_dead = match c.activation {
                Unary::Relu => {
                    let dead = (0..width)
                        .filter(|&u| (0..n).all(|i| a[i * width + u] == 0.0))
                        .count();
                    dead as f64 / width as f64
                }
                _ => a.iter().filter(|v| v.abs() > 0.99).count() as f64 / k,
            };
            let step = (a.len() / 20_000).max(1);
            LayerStats {
                mean,
                std,
                saturated_or_dead,
                grad_norm,
                sample: a.iter().step_by(step).copied().collect(),
            }
        })
        .collect())
}

/// Six decimals, or three significant digits in scientific notation for small values.
fn num(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{v:.6}")
    }
}

pub fn lab(r: &mut Report, quick: bool) -> Result<()> {
    let (layers, width, n) = if quick {
        (10, 100, 200)
    } else {
        (10, 500, 1000)
    };
    r.heading(1, "Activations under each initialization");
    r.text(&format!(
        "A {layers}-layer net of {width} units (no biases) on {n} inputs drawn from N(0, 1). The lecture's point: with small random weights the activations shrink layer by layer to zero, so the weight gradients (`dL/dW = x^T dy`) are tiny in every layer; with large ones tanh saturates at ±1, where its local gradient `1 - y^2` is nearly zero (the lecture: no learning; the weight gradients measured here are large instead, growing toward the input, because each `W^T` of std 1 multiplies the backward signal by about sqrt({width}) more than the saturation takes away: gradients that say nothing useful); Xavier (the lecture's `std = 1/sqrt(fan_in)`; Glorot's own, `sqrt(2/(fan_in + fan_out))`, is the init lab's) keeps tanh alive; ReLU halves the variance at each layer under Xavier, which He (`std = sqrt(2/fan_in)`) corrects. Below each configuration, what this run measured."
    ));
    let mut std_series = Vec::new();
    let mut grad_series = Vec::new();
    for (ci, c) in configs().iter().enumerate() {
        let stats = run(c, layers, width, n, 1)?;
        r.heading(2, c.name);
        let kind = if c.activation == Unary::Relu {
            "dead units"
        } else {
            "saturated (abs y > 0.99)"
        };
        r.table(
            &["hidden layer", "mean", "std", kind, "weight gradient norm"],
            stats
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    vec![
                        (i + 1).to_string(),
                        num(s.mean),
                        num(s.std),
                        format!("{:.1}%", 100.0 * s.saturated_or_dead),
                        format!("{:.3e}", s.grad_norm),
                    ]
                })
                .collect(),
        );
        let lines: Vec<String> = stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "hidden layer {} had mean {:.6} and std {:.6}",
                    i + 1,
                    s.mean,
                    s.std
                )
            })
            .collect();
        r.text(&format!("`{}`", lines.join("`; `")));
        let (first, last) = (&stats[0], &stats[stats.len() - 1]);
        let (gmin, gmax) = stats.iter().fold((f64::MAX, 0f64), |(a, b), s| {
            (a.min(s.grad_norm), b.max(s.grad_norm))
        });
        r.text(&format!(
            "Measured: the activations' std goes from {} (layer 1) to {} (layer {}), {} of the units of the last layer {}; the weight gradient norms lie between {gmin:.2e} and {gmax:.2e}, layer 1's {:.2e} times layer {}'s.",
            num(first.std),
            num(last.std),
            stats.len(),
            format_args!("{:.1}%", 100.0 * last.saturated_or_dead),
            if c.activation == Unary::Relu {
                "dead (zero on every input)"
            } else {
                "saturated"
            },
            first.grad_norm / last.grad_norm,
            stats.len()
        ));
        let file = format!("activations-hist-{ci}.png");
        let panels: Vec<(String, Vec<f32>)> = stats
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("layer {}", i + 1), s.sample.clone()))
            .collect();
        plot::histograms(
            &r.path(&file),
            &format!("Activations per layer: {}", c.name),
            &panels,
        )?;
        r.figure(
            &file,
            &format!(
                "Histograms of each hidden layer's activations, {} (one x-range for all the panels).",
                c.name
            ),
        );
        std_series.push(Series::new(
            c.name,
            stats
                .iter()
                .enumerate()
                .map(|(i, s)| ((i + 1) as f64, s.std))
                .collect(),
        ));
        grad_series.push(Series::new(
            c.name,
            stats
                .iter()
                .enumerate()
                .map(|(i, s)| ((i + 1) as f64, s.grad_norm))
                .collect(),
        ));
    }
    plot::lines(
        &r.path("activations-std.png"),
        &Plot {
            title: "Activation std per layer",
            x_label: "hidden layer",
            y_label: "std (log scale)",
            log_y: true,
        },
        &std_series,
    )?;
    r.heading(2, "Summary");
    r.figure(
        "activations-std.png",
        "The standard deviation of each layer's activations, per initialization.",
    );
    plot::lines(
        &r.path("activations-grad.png"),
        &Plot {
            title: "Weight gradient norm per layer",
            x_label: "hidden layer",
            y_label: "norm (log scale)",
            log_y: true,
        },
        &grad_series,
    )?;
    r.figure(
        "activations-grad.png",
        "The norm of each layer's weight gradient for one backward pass.",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lecture's claims, at a small size: N(0, 0.01^2) drives tanh's last layer below 1e-4
    /// while Xavier keeps it above 0.1; N(0, 1) saturates tanh; He keeps ReLU's std within a
    /// factor 2 across 10 layers, where Xavier halves the variance at each layer.
    #[test]
    fn the_lecture_s_effects() {
        let c = configs();
        let std = |i: usize| -> Vec<f64> {
            run(&c[i], 10, 200, 300, 1)
                .unwrap()
                .iter()
                .map(|s| s.std)
                .collect()
        };
        let small = std(0);
        assert!(small[9] < 1e-4, "{small:?}");
        let big = run(&c[1], 10, 200, 300, 1).unwrap();
        assert!(
            big.iter().all(|s| s.saturated_or_dead > 0.5),
            "tanh saturates"
        );
        let xavier = std(2);
        assert!(xavier[9] > 0.1, "{xavier:?}");
        let he = std(4);
        let (lo, hi) = he
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), &s| (a.min(s), b.max(s)));
        assert!(hi / lo < 2.0, "{he:?}");
        let relu_xavier = std(3);
        assert!(relu_xavier[9] < 0.1 * relu_xavier[0], "{relu_xavier:?}");
        // Small weights: dL/dW = x^T dy with x near zero, so the deep layers' weight gradients
        // vanish next to Xavier's.
        let g_small = run(&c[0], 10, 200, 300, 1).unwrap();
        let g_xavier = run(&c[2], 10, 200, 300, 1).unwrap();
        assert!(
            g_small[9].grad_norm < 1e-3 * g_xavier[9].grad_norm,
            "{} vs {}",
            g_small[9].grad_norm,
            g_xavier[9].grad_norm
        );
    }
}
