//! `optimizers`: SGD, Momentum, Nesterov, Adagrad, RMSprop and Adam on 2-D surfaces (an
//! ill-conditioned bowl, a saddle point, a function with a local minimum), drawn as paths over
//! the surface; and the same optimizers training a real network.
//!
//! The paths use regimen's own optimizers (`regimen::optim`), stepping a model whose one
//! parameter is the point `(x, y)` and whose gradient is the surface's.

use anyhow::Result;
use regimen::layer::{Ctx, Layer, Param, ParamKind};
use regimen::optim::{Adagrad, Adam, Optim, OptimConfig, Optimizer, RmsProp, Sgd};
use regimen::{Device, Tensor};

use super::report::Report;
use crate::plot::{self, Plot, Series};

/// A 2-D function with its gradient.
pub struct Surface {
    pub name: &'static str,
    pub f: fn(f64, f64) -> f64,
    pub grad: fn(f64, f64) -> (f64, f64),
    pub start: (f64, f64),
    /// `(x0, x1, y0, y1)` drawn.
    pub window: (f64, f64, f64, f64),
    pub about: &'static str,
    /// The learning rate of each optimizer of [`optimizers`] on this surface.
    pub lrs: [f32; 6],
}

pub fn surfaces() -> Vec<Surface> {
    vec![
        Surface {
            name: "ill-conditioned bowl",
            f: |x, y| 0.01 * x * x + y * y,
            grad: |x, y| (0.02 * x, 2.0 * y),
            start: (-9.0, 2.0),
            window: (-10.0, 2.0, -3.0, 3.0),
            lrs: [0.9, 0.5, 0.5, 1.0, 0.1, 0.3],
            about: "f = 0.01 x^2 + y^2: the curvature is 100 times larger along y than along x (condition number 100). SGD, whose rate the steep direction limits, zig-zags across it while crawling along the shallow one; momentum builds up speed along the shallow direction and damps the zig-zag.",
        },
        Surface {
            name: "saddle point",
            f: |x, y| 0.5 * x * x - 0.5 * y * y + 0.05 * y.powi(4),
            grad: |x, y| (x, -y + 0.2 * y.powi(3)),
            start: (-4.0, 1e-3),
            window: (-4.5, 1.5, -3.5, 3.5),
            lrs: [0.1, 0.03, 0.03, 0.5, 0.03, 0.1],
            about: "f = x^2/2 - y^2/2 + y^4/20: a saddle at the origin (minima at y = ±sqrt 5). Starting almost exactly on the ridge, the gradient along y is nearly zero: plain SGD lingers at the saddle, momentum and the adaptive methods leave it sooner.",
        },
        Surface {
            name: "local minimum",
            f: |x, y| 0.1 * x.powi(4) - x * x + 0.6 * x + y * y,
            grad: |x, y| (0.4 * x.powi(3) - 2.0 * x + 0.6, 2.0 * y),
            start: (3.5, 1.5),
            window: (-4.0, 4.0, -2.0, 2.0),
            lrs: [0.05, 0.04, 0.04, 0.5, 0.05, 0.1],
            about: "f = x^4/10 - x^2 + 0.6 x + y^2: a local minimum near x = 2.07 and the global one near x = -2.37. SGD stops in the first minimum it meets; momentum can carry the point over the ridge.",
        },
    ]
}

/// A named optimizer factory.
pub type Factory = (&'static str, Box<dyn Fn() -> Optim>);

/// The optimizers, in the order of [`Surface::lrs`].
pub fn optimizers() -> Vec<Factory> {
    fn o(opt: impl Optimizer + 'static) -> Optim {
        Optim::new(opt, OptimConfig::default()).expect("valid hyperparameters")
    }
    let sgd = |m: f64, n: bool| Sgd {
        momentum: m,
        dampening: 0.0,
        nesterov: n,
    };
    vec![
        ("SGD", Box::new(move || o(sgd(0.0, false)))),
        ("Momentum", Box::new(move || o(sgd(0.9, false)))),
        ("Nesterov", Box::new(move || o(sgd(0.9, true)))),
        ("Adagrad", Box::new(|| o(Adagrad::default()))),
        ("RMSprop", Box::new(|| o(RmsProp::default()))),
        ("Adam", Box::new(|| o(Adam::default()))),
    ]
}

/// A model whose parameter is a point.
struct Point {
    p: Param,
}

impl Layer for Point {
    fn describe(&self) -> String {
        "Point".into()
    }
    fn output_shape(&self, input: &[usize]) -> regimen::Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&mut self, x: &Tensor, _ctx: &Ctx) -> regimen::Result<Tensor> {
        Ok(x.clone())
    }
    fn backward(&mut self, dy: &Tensor) -> regimen::Result<Tensor> {
        Ok(dy.clone())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param)) {
        f(&regimen::layer::join(prefix, "point"), &mut self.p);
    }
}

/// The path of `optim` from the surface's start, `steps` steps at rate `lr`.
pub fn path(s: &Surface, mut optim: Optim, lr: f32, steps: usize) -> Result<Vec<(f64, f64)>> {
    let (x0, y0) = s.start;
    let mut m = Point {
        p: Param::new(
            Tensor::from_vec(&[2], vec![x0 as f32, y0 as f32])?,
            ParamKind::Weight,
        ),
    };
    let mut out = vec![s.start];
    for _ in 0..steps {
        let v = m.p.value.to_vec();
        let (gx, gy) = (s.grad)(v[0] as f64, v[1] as f64);
        m.p.grad = Tensor::from_host(&[2], vec![gx as f32, gy as f32], Device::Cpu)?;
        optim.step(&mut m, lr)?;
        let v = m.p.value.to_vec();
        let (x, y) = (v[0] as f64, v[1] as f64);
        if !(x.is_finite() && y.is_finite()) {
            break;
        }
        out.push((x, y));
    }
    Ok(out)
}

pub fn lab(r: &mut Report, quick: bool, data: &super::Data) -> Result<()> {
    r.heading(1, "Optimizers");
    r.text("The paths of regimen's optimizers on three 2-D surfaces, over a map of the surface (darker is lower), then the same optimizers training a network on real data.");
    let steps = if quick { 60 } else { 150 };
    for (si, s) in surfaces().iter().enumerate() {
        r.heading(2, s.name);
        r.text(s.about);
        let mut paths = Vec::new();
        let mut rows = Vec::new();
        for ((name, make), &lr) in optimizers().iter().zip(&s.lrs) {
            let p = path(s, make(), lr, steps)?;
            let &(x, y) = p.last().expect("starts with the start");
            rows.push(vec![
                name.to_string(),
                format!("{lr}"),
                format!("({x:.3}, {y:.3})"),
                format!("{:.4}", (s.f)(x, y)),
            ]);
            paths.push(Series::new(name, p));
        }
        r.table(
            &[
                "optimizer",
                "learning rate",
                &format!("point after {steps} steps"),
                "f there",
            ],
            rows,
        );
        let file = format!("optimizers-surface-{si}.png");
        plot::paths(
            &r.path(&file),
            &format!("{}: {steps} steps", s.name),
            s.f,
            s.window,
            &paths,
        )?;
        r.figure(&file, &format!("Optimizer paths on the {}.", s.name));
    }
    r.heading(2, "Training a network");
    let epochs = if quick { 2 } else { 8 };
    let mut series = Vec::new();
    let mut rows = Vec::new();
    for (name, lr) in [
        ("sgd", 0.05),
        ("momentum", 0.05),
        ("nesterov", 0.05),
        ("adagrad", 0.05),
        ("rmsprop", 1e-3),
        ("adam", 1e-3),
    ] {
        let t = super::train_mlp(data, name, lr, epochs)?;
        let last = t.history.last().expect("at least one epoch");
        rows.push(vec![
            name.to_string(),
            format!("{lr}"),
            format!("{:.4}", last.train_loss),
            format!("{:.2}%", 100.0 * last.val_acc.unwrap_or(f32::NAN)),
        ]);
        let per_epoch = data.prepared.train.len().div_ceil(64) as f64;
        series.push(Series::new(
            name,
            t.steps
                .iter()
                .map(|&(s, l)| (s as f64 / per_epoch, l as f64))
                .collect(),
        ));
    }
    r.text(&format!(
        "The MLP `{}` on {} for {epochs} epochs, batch 64, from the same initial weights and data order, per optimizer, each at a usual rate of its own (0.05 for SGD, momentum, Nesterov and Adagrad; 1e-3 for RMSprop and Adam): a comparison of usual settings, not of one rate.",
        super::MLP,
        data.name
    ));
    r.table(
        &[
            "optimizer",
            "learning rate",
            "final train loss",
            "validation accuracy",
        ],
        rows,
    );
    plot::lines(
        &r.path("optimizers-training.png"),
        &Plot {
            title: "Training loss",
            x_label: "epoch",
            y_label: "cross-entropy",
            log_y: false,
        },
        &series,
    )?;
    r.figure(
        "optimizers-training.png",
        "The training loss of the same network under each optimizer, every tenth of an epoch.",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(s: &Surface, which: &str, steps: usize) -> (f64, f64) {
        let all = optimizers();
        let i = all.iter().position(|o| o.0 == which).unwrap();
        *path(s, (all[i].1)(), s.lrs[i], steps)
            .unwrap()
            .last()
            .unwrap()
    }

    #[test]
    fn momentum_beats_sgd_on_the_bowl_and_leaves_the_saddle() {
        let s = surfaces();
        let f = |p: (f64, f64)| (s[0].f)(p.0, p.1);
        assert!(f(end(&s[0], "Momentum", 100)) < f(end(&s[0], "SGD", 100)));
        // Saddle: after 30 steps SGD is still near the ridge, momentum and Adam have left it.
        let sgd = end(&s[1], "SGD", 30).1.abs();
        assert!(sgd < 0.5, "{sgd}");
        assert!(end(&s[1], "Momentum", 30).1.abs() > sgd);
        assert!(end(&s[1], "Adam", 30).1.abs() > 1.0);
        // Local minimum: SGD stays in the first one (x > 0), momentum reaches the global one.
        assert!(end(&s[2], "SGD", 150).0 > 0.0);
        assert!(end(&s[2], "Momentum", 150).0 < 0.0);
    }
}
