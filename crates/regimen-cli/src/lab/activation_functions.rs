//! `activation-functions`: each activation with its derivative, and the same network trained
//! with each: accuracy, epochs to a target accuracy, and the fraction of dead ReLUs.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use regimen::layer::{Ctx, Layer};
use regimen::layers::{parse_activation, Activation};
use regimen::Tensor;

use super::report::Report;
use super::Data;
use crate::plot::{self, Plot, Series};

/// `(name, activation token)`; Maxout replaces the linear layer and its activation.
pub const ACTIVATIONS: &[(&str, &str)] = &[
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
    ("ReLU", "relu"),
    ("Leaky ReLU (0.01)", "leaky_relu"),
    ("PReLU", "prelu"),
    ("ELU", "elu"),
    ("SELU", "selu"),
    ("Maxout (k=2)", "maxout"),
    ("Swish", "swish"),
    ("Softplus", "softplus"),
    ("GELU", "gelu"),
];

pub fn spec(token: &str, width: usize) -> String {
    if token == "maxout" {
        format!("flatten,maxout:{width},maxout:{width},linear:classes")
    } else {
        let init = if token == "selu" { ",init=lecun" } else { "" };
        format!("flatten,linear:{width},{token},linear:{width},{token},linear:classes{init}")
    }
}

/// `f(x)` and `f'(x)` on `xs` through regimen's own forward and backward.
pub fn curve(token: &str, xs: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let x = Tensor::from_vec(&[1, xs.len()], xs.to_vec())?;
    let mut layer: Box<dyn Layer> = match token {
        "prelu" => Box::new(regimen::layers::PReLU::new(1)),
        t => Box::new(Activation::new(parse_activation(t)?)),
    };
    let y = layer.forward(&x, &Ctx::train())?;
    let dy = Tensor::from_vec(&[1, xs.len()], vec![1.0; xs.len()])?;
    let d = layer.backward(&dy)?;
    Ok((y.to_vec(), d.to_vec()))
}

/// Fraction of the hidden units of a trained ReLU net that output zero on every input.
fn dead_fraction(
    model: &mut regimen::layers::Sequential,
    data: &regimen::data::Dataset,
) -> Result<f64> {
    type Outputs = Arc<Mutex<Vec<(String, Vec<f32>, usize)>>>;
    let outs: Outputs = Arc::default();
    {
        let o = outs.clone();
        model.set_hook(Box::new(move |name, t| {
            if name == "2" || name == "4" {
                o.lock()
                    .expect("not poisoned")
                    .push((name.to_string(), t.to_vec(), t.shape()[1]));
            }
        }));
    }
    let idx: Vec<usize> = (0..data.len().min(1000)).collect();
    let (x, _) = data.batch(&idx, regimen::Device::Cpu)?;
    model.forward(&x, &Ctx::eval())?;
    model.clear_hook();
    let outs = outs.lock().expect("not poisoned");
    let (mut dead, mut total) = (0, 0);
    for (_, v, width) in outs.iter() {
        let n = v.len() / width;
        dead += (0..*width)
            .filter(|&u| (0..n).all(|i| v[i * width + u] <= 0.0))
            .count();
        total += width;
    }
    Ok(dead as f64 / total.max(1) as f64)
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    r.heading(1, "Activation functions");
    r.text("Each activation and its derivative, computed by regimen's own forward and backward passes (PReLU at its initial slope 0.25; Maxout is the maximum of two linear functions, so it has no fixed curve).");
    let xs: Vec<f32> = (0..=160).map(|i| -4.0 + i as f32 * 0.05).collect();
    let mut fs = Vec::new();
    let mut ds = Vec::new();
    for (name, token) in ACTIVATIONS.iter().filter(|a| a.1 != "maxout") {
        let (y, d) = curve(token, &xs)?;
        fs.push(Series::new(
            name,
            xs.iter()
                .zip(&y)
                .map(|(&x, &v)| (x as f64, v as f64))
                .collect(),
        ));
        ds.push(Series::new(
            name,
            xs.iter()
                .zip(&d)
                .map(|(&x, &v)| (x as f64, v as f64))
                .collect(),
        ));
    }
    plot::lines(
        &r.path("activation-functions.png"),
        &Plot {
            title: "Activation functions",
            x_label: "x",
            y_label: "f(x)",
            log_y: false,
        },
        &fs,
    )?;
    r.figure("activation-functions.png", "The activation functions.");
    plot::lines(
        &r.path("activation-derivatives.png"),
        &Plot {
            title: "Their derivatives",
            x_label: "x",
            y_label: "f'(x)",
            log_y: false,
        },
        &ds,
    )?;
    r.figure("activation-derivatives.png", "Their derivatives: sigmoid's is at most 0.25 and vanishes away from 0 (saturation); ReLU's is 0 for every negative input.");

    let (width, epochs) = if quick { (64, 3) } else { (256, 8) };
    let target = if quick { 0.8 } else { 0.85 };
    r.heading(2, "Training with each");
    r.text(&format!(
        "The network `{}` (each activation in place of ReLU; SELU with LeCun initialization) trained with SGD (momentum 0.9, lr 0.02, batch 64) for {epochs} epochs on {}.",
        spec("relu", width),
        data.name
    ));
    let p = &data.prepared;
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for (name, token) in ACTIVATIONS {
        let mut t = super::momentum_trainer(&spec(token, width), p.train.clone(), epochs, 2, 0.02)?
            .with_validation(p.validation.clone());
        super::run_training(&mut t)?;
        let h = t.history().to_vec();
        let reached = h
            .iter()
            .find(|r| r.val_acc.unwrap_or(0.0) >= target)
            .map(|r| r.epoch);
        let dead = if *token == "relu" {
            format!(
                "{:.1}%",
                100.0
                    * dead_fraction(
                        &mut t.model,
                        p.validation.as_ref().expect("a validation split")
                    )?
            )
        } else {
            String::new()
        };
        let last = h.last().expect("epochs >= 1");
        rows.push(vec![
            name.to_string(),
            format!("{:.2}%", 100.0 * last.val_acc.unwrap_or(f32::NAN)),
            reached.map_or("not reached".into(), |e| e.to_string()),
            dead,
        ]);
        curves.push(Series::new(
            name,
            h.iter()
                .map(|r| (r.epoch as f64, 100.0 * r.val_acc.unwrap_or(f32::NAN) as f64))
                .collect(),
        ));
    }
    r.table(
        &[
            "activation",
            "validation accuracy",
            &format!("epochs to {:.0}%", 100.0 * target),
            "dead ReLUs",
        ],
        rows,
    );
    plot::lines(
        &r.path("activation-training.png"),
        &Plot {
            title: "Validation accuracy per epoch",
            x_label: "epoch",
            y_label: "accuracy (%)",
            log_y: false,
        },
        &curves,
    )?;
    r.figure(
        "activation-training.png",
        "Validation accuracy per epoch of the same network with each activation.",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The curves are the functions: sigmoid's derivative peaks at 0.25 at 0, ReLU's is 0 below
    /// 0 and 1 above, tanh is odd.
    #[test]
    fn curves_and_derivatives() {
        let xs = [-2.0, -0.5, 0.0, 0.5, 2.0];
        let (_, d) = curve("sigmoid", &xs).unwrap();
        assert!((d[2] - 0.25).abs() < 1e-6 && d.iter().all(|&v| v <= 0.25));
        let (y, d) = curve("relu", &xs).unwrap();
        assert_eq!(y, vec![0.0, 0.0, 0.0, 0.5, 2.0]);
        assert_eq!(d, vec![0.0, 0.0, 0.0, 1.0, 1.0]);
        let (y, _) = curve("tanh", &xs).unwrap();
        assert!((y[0] + y[4]).abs() < 1e-6);
        let (y, _) = curve("prelu", &xs).unwrap();
        assert_eq!(y[0], -0.5);
    }
}
