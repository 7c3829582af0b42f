//! `ensembles`: N independent models against one, and a snapshot ensemble from one run with
//! warm restarts (Huang et al. 2017); the gain in accuracy.

use anyhow::Result;
use regimen::ensemble::{self, Member};
use regimen::optim::{Optim, OptimConfig, Sgd};
use regimen::schedule::{parse_schedule, Unit};
use regimen::train::FitConfig;
use regimen::trainer::{SnapshotEnsemble, Trainer};
use regimen::{models, Rng};

use super::report::Report;
use super::Data;
use crate::plot::{self, Plot, Series};

const SPEC: &str = "flatten,linear:256,relu,dropout:0.2,linear:classes";

fn sgd() -> Optim {
    Optim::new(
        Sgd {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
        },
        OptimConfig::default(),
    )
    .expect("valid")
}

/// One model trained with seed `seed` (initialization and batch order) and a cosine schedule.
fn independent(data: &Data, seed: u64, epochs: usize) -> Result<Member> {
    let p = &data.prepared;
    let model = models::for_input(
        SPEC,
        p.train.image_shape,
        p.train.num_classes(),
        &mut Rng::new(seed),
    )?;
    let per_epoch = p.train.len().div_ceil(64);
    let s = parse_schedule("cosine", 0.05, epochs * per_epoch, 0, None)?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed,
        workers: 0,
        ..Default::default()
    };
    let mut t = Trainer::new(model, sgd(), s, fit, p.train.clone());
    super::run_training(&mut t)?;
    Ok(Member {
        name: format!("seed {seed}"),
        model: Box::new(t.model),
        preprocess: None,
    })
}

/// The snapshots of one run with `cycles` warm restarts of `cycle` epochs each.
fn snapshots(
    data: &Data,
    dir: &std::path::Path,
    cycles: usize,
    cycle: usize,
) -> Result<Vec<Member>> {
    let p = &data.prepared;
    let model = models::for_input(
        SPEC,
        p.train.image_shape,
        p.train.num_classes(),
        &mut Rng::new(100),
    )?;
    let epochs = cycles * cycle;
    let s = parse_schedule(&format!("restarts:t0={cycle}"), 0.1, epochs, 0, None)?;
    let fit = FitConfig {
        epochs,
        batch_size: 64,
        seed: 100,
        unit: Unit::Epoch,
        workers: 0,
        ..Default::default()
    };
    let mut t =
        Trainer::new(model, sgd(), s, fit, p.train.clone()).callback(SnapshotEnsemble::new(dir));
    super::run_training(&mut t)?;
    let mut out = Vec::new();
    for c in 1..=cycles {
        let f = SnapshotEnsemble::path_for(dir, c * cycle);
        let mut m = models::for_input(
            SPEC,
            p.train.image_shape,
            p.train.num_classes(),
            &mut Rng::new(0),
        )?;
        regimen::checkpoint::load(&f, &mut m)?;
        out.push(Member {
            name: format!("snapshot after epoch {}", c * cycle),
            model: Box::new(m),
            preprocess: None,
        });
    }
    Ok(out)
}

pub fn lab(r: &mut Report, quick: bool, data: &Data) -> Result<()> {
    let (n, epochs, cycles, cycle) = if quick { (3, 3, 3, 2) } else { (5, 8, 5, 4) };
    r.heading(1, "Ensembles");
    r.text(&format!(
        "The MLP `{SPEC}` on {}. Independent models differ in their seed (initialization, batch order); an ensemble averages their predicted probabilities and takes the arg-max. A snapshot ensemble takes one run with warm restarts ({cycles} cosine cycles of {cycle} epochs) and keeps the model at the end of each cycle.",
        data.name
    ));
    let test = &data.prepared.test;
    let mut members = Vec::new();
    for seed in 0..n as u64 {
        members.push(independent(data, seed + 1, epochs)?);
    }
    let mut rows = Vec::new();
    let mut curve = Vec::new();
    let mut singles = Vec::new();
    for k in 1..=n {
        let rep = ensemble::evaluate(&mut members[..k], test, regimen::Device::Cpu)?;
        singles = rep.members.iter().map(|m| m.2).collect();
        curve.push((k as f64, 100.0 * rep.accuracy as f64));
    }
    let mean_single = singles.iter().sum::<f32>() / singles.len() as f32;
    let best_single = singles.iter().cloned().fold(0.0, f32::max);
    for (m, acc) in members.iter().zip(&singles) {
        rows.push(vec![m.name.clone(), format!("{:.2}%", 100.0 * acc)]);
    }
    let full = curve.last().expect("n >= 1").1;
    rows.push(vec![format!("ensemble of {n}"), format!("{full:.2}%")]);
    r.heading(2, "Independent models");
    r.table(&["model", "test accuracy"], rows);
    r.text(&format!(
        "The ensemble of {n} scores {full:.2}%, {:+.2} points over the mean single model ({:.2}%) and {:+.2} over the best one.",
        full - 100.0 * mean_single as f64,
        100.0 * mean_single,
        full - 100.0 * best_single as f64
    ));
    plot::lines(
        &r.path("ensembles-size.png"),
        &Plot {
            title: "Test accuracy of an ensemble of k independent models",
            x_label: "k",
            y_label: "accuracy (%)",
            log_y: false,
        },
        &[Series::new("ensemble", curve)],
    )?;
    r.figure(
        "ensembles-size.png",
        "Accuracy of the first k models averaged.",
    );

    r.heading(2, "Snapshot ensemble");
    let dir = r.path("snapshots");
    let mut snaps = snapshots(data, &dir, cycles, cycle)?;
    let rep = ensemble::evaluate(&mut snaps, test, regimen::Device::Cpu)?;
    let mut rows: Vec<Vec<String>> = rep
        .members
        .iter()
        .map(|m| vec![m.0.clone(), format!("{:.2}%", 100.0 * m.2)])
        .collect();
    rows.push(vec![
        format!("ensemble of {cycles} snapshots"),
        format!("{:.2}%", 100.0 * rep.accuracy),
    ]);
    r.table(&["model", "test accuracy"], rows);
    let best = rep.members.iter().map(|m| m.2).fold(0.0, f32::max);
    r.text(&format!(
        "One training run's cost: the snapshots together score {:.2}%, {:+.2} points over the best snapshot alone.",
        100.0 * rep.accuracy,
        100.0 * (rep.accuracy - best)
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ensemble_beats_its_average_member() {
        let data = Data::load(true, None).unwrap();
        let mut members: Vec<Member> = (1..=3).map(|s| independent(&data, s, 3).unwrap()).collect();
        let rep =
            ensemble::evaluate(&mut members, &data.prepared.test, regimen::Device::Cpu).unwrap();
        let mean = rep.members.iter().map(|m| m.2).sum::<f32>() / 3.0;
        assert!(rep.accuracy > mean, "{rep:?}");
    }
}
