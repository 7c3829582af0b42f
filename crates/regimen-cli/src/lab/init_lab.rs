//! `init`: training curves of the same deep network under each initialization.

use anyhow::Result;
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::schedule::Constant;

use super::report::Report;
use super::Data;
use crate::plot::{self, Plot, Series};

/// `(label, init option)` of the comparison.
pub const INITS: &[(&str, &str)] = &[
    // `constant` is 1/width, the scale at which the signal neither vanishes nor saturates:
    // what fails is the symmetry alone.
    ("W constant (1/width)", "constant"),
    ("N(0, 0.01^2)", "normal:0.01"),
    ("N(0, 1)", "normal:1"),
    ("Xavier", "xavier"),
    ("He", "he"),
];

pub fn spec(depth: usize, width: usize, activation: &str, init: &str) -> String {
    let init = if init == "constant" {
        format!("constant:{}", 1.0 / width as f64)
    } else {
        init.to_string()
    };
    format!("deep-mlp:{depth}:{width},activation={activation},init={init}")
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    let (depth, width, epochs) = if quick { (6, 64, 3) } else { (8, 256, 8) };
    r.heading(1, "Initialization and training");
    r.text(&format!(
        "The same {depth}-layer MLP of {width} units, trained with SGD (momentum 0.9, lr 0.01, batch 64) for {epochs} epochs on {}, under each initialization, with tanh and with ReLU. The lecture asks first what a constant W does: every unit of a layer then computes the same output and receives the same gradient, so the units stay identical forever and each layer is worth one unit. It expects small weights to leave a deep tanh net at chance (its gradients vanish), N(0, 1) to saturate it, and Xavier and He to train; the table says what this run did.",
        data.name
    ));
    for act in ["tanh", "relu"] {
        r.heading(2, &format!("{act} network"));
        let mut series = Vec::new();
        let mut rows = Vec::new();
        for (label, init) in INITS {
            let optim = Optim::new(
                Sgd {
                    momentum: 0.9,
                    dampening: 0.0,
                    nesterov: false,
                },
                OptimConfig::default(),
            )?;
            let t = super::train(
                data,
                &spec(depth, width, act, init),
                optim,
                Box::new(Constant(0.01)),
                epochs,
                64,
            )?;
            let last = t.history.last();
            rows.push(vec![
                label.to_string(),
                last.map_or("-".into(), |r| format!("{:.4}", r.train_loss)),
                last.and_then(|r| r.val_acc)
                    .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
                t.diverged.clone().unwrap_or_else(|| "no".into()),
            ]);
            let name = if t.diverged.is_some() {
                format!("{label} (diverged)")
            } else {
                label.to_string()
            };
            series.push(Series::new(
                &name,
                t.history
                    .iter()
                    .map(|r| (r.epoch as f64, r.train_loss as f64))
                    .collect(),
            ));
        }
        r.table(
            &[
                "initialization",
                "final train loss",
                "validation accuracy",
                "diverged",
            ],
            rows,
        );
        let file = format!("init-{act}.png");
        plot::lines(
            &r.path(&file),
            &Plot {
                title: &format!("Training loss, {act} network, per initialization"),
                x_label: "epoch",
                y_label: "cross-entropy",
                log_y: false,
            },
            &series,
        )?;
        r.figure(
            &file,
            &format!("Training loss per epoch of the {act} network under each initialization."),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deep tanh net with N(0, 0.01^2) weights stays at chance; Xavier learns.
    #[test]
    fn small_weights_stall_a_deep_tanh_net() {
        let data = Data::load(true, None).unwrap();
        let acc = |init: &str| {
            let optim = Optim::new(
                Sgd {
                    momentum: 0.9,
                    dampening: 0.0,
                    nesterov: false,
                },
                OptimConfig::default(),
            )
            .unwrap();
            let t = super::super::train(
                &data,
                &spec(6, 64, "tanh", init),
                optim,
                Box::new(Constant(0.01)),
                3,
                64,
            )
            .unwrap();
            t.history.last().unwrap().val_acc.unwrap()
        };
        let small = acc("normal:0.01");
        let xavier = acc("xavier");
        assert!(small < 0.25, "chance is 0.1: {small}");
        assert!(xavier > 0.7, "{xavier}");
        // A constant W: one feature per layer, far below Xavier.
        let constant = acc("constant");
        assert!(
            constant < xavier - 0.3,
            "constant {constant} vs Xavier {xavier}"
        );
    }
}
