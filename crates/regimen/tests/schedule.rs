//! Schedules: each learning-rate sequence against `torch.optim.lr_scheduler`, value by value
//! over its whole length (fixtures from `tools/golden_optim.py`), the parser's errors, warmup
//! composition and the linear scaling rule.

use regimen::schedule::*;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let path = format!(
        "{}/tests/fixtures/schedules.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"))
}
fn u(v: &Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}")) as usize
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap() as usize)
        .collect()
}

/// The regimen schedule for a PyTorch scheduler and its constructor arguments.
fn build(class: &str, p: &Value, base: f64) -> Box<dyn Schedule> {
    let or = |k: &str, d: f64| p.get(k).and_then(Value::as_f64).unwrap_or(d);
    match class {
        "StepLR" => Box::new(StepDecay {
            base,
            step_size: u(p, "step_size"),
            gamma: f(p, "gamma"),
        }),
        "MultiStepLR" => Box::new(MultiStep {
            base,
            milestones: usizes(&p["milestones"]),
            gamma: f(p, "gamma"),
        }),
        "ExponentialLR" => Box::new(Exponential {
            base,
            gamma: f(p, "gamma"),
        }),
        "CosineAnnealingLR" => Box::new(Cosine {
            base,
            t_max: u(p, "T_max"),
            eta_min: or("eta_min", 0.0),
        }),
        // LinearLR / ConstantLR are warmups in front of a constant schedule.
        "LinearLR" => {
            assert_eq!(or("end_factor", 1.0), 1.0);
            Box::new(Warmup {
                kind: WarmupKind::Linear {
                    start_factor: f(p, "start_factor"),
                },
                steps: u(p, "total_iters"),
                then: Box::new(Constant(base)),
            })
        }
        "ConstantLR" => Box::new(Warmup {
            kind: WarmupKind::Constant {
                factor: f(p, "factor"),
            },
            steps: u(p, "total_iters"),
            then: Box::new(Constant(base)),
        }),
        "PolynomialLR" => Box::new(Polynomial {
            base,
            total: u(p, "total_iters"),
            power: f(p, "power"),
        }),
        "CyclicLR" => {
            let up = u(p, "step_size_up");
            let mode = match p
                .get("mode")
                .and_then(Value::as_str)
                .unwrap_or("triangular")
            {
                "triangular" => CyclicMode::Triangular,
                "triangular2" => CyclicMode::Triangular2,
                "exp_range" => CyclicMode::ExpRange {
                    gamma: f(p, "gamma"),
                },
                m => panic!("{m}"),
            };
            let down = p
                .get("step_size_down")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .unwrap_or(up);
            Box::new(Cyclic {
                base: f(p, "base_lr"),
                max: f(p, "max_lr"),
                up,
                down,
                mode,
            })
        }
        "OneCycleLR" => Box::new(OneCycle {
            max: f(p, "max_lr"),
            total: u(p, "total_steps"),
            pct_start: or("pct_start", 0.3),
            div: or("div_factor", 25.0),
            final_div: or("final_div_factor", 1e4),
            anneal: if p.get("anneal_strategy").and_then(Value::as_str) == Some("linear") {
                Anneal::Linear
            } else {
                Anneal::Cos
            },
            three_phase: p
                .get("three_phase")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }),
        "CosineAnnealingWarmRestarts" => Box::new(CosineRestarts {
            base,
            t_0: u(p, "T_0"),
            t_mult: p.get("T_mult").and_then(Value::as_u64).unwrap_or(1) as usize,
            eta_min: or("eta_min", 0.0),
        }),
        "ReduceLROnPlateau" => Box::new(ReduceOnPlateau::new(
            base,
            f(p, "factor"),
            u(p, "patience"),
            f(p, "threshold"),
            u(p, "cooldown"),
            f(p, "min_lr"),
        )),
        "SequentialLR" => Box::new(Sequential {
            schedules: p["schedulers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| build(s["scheduler"].as_str().unwrap(), &s["params"], base))
                .collect(),
            milestones: usizes(&p["milestones"]),
        }),
        other => panic!("no regimen schedule for {other}"),
    }
}

#[test]
fn every_schedule_matches_pytorch_value_by_value() {
    let all = cases();
    assert!(all.len() >= 19);
    for case in all {
        let name = case["name"].as_str().unwrap();
        let mut s = build(
            case["scheduler"].as_str().unwrap(),
            &case["params"],
            f(&case, "base_lr"),
        );
        let want: Vec<f64> = case["lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let metrics: Vec<f32> = case
            .get("metrics")
            .and_then(Value::as_array)
            .map(|m| m.iter().map(|v| v.as_f64().unwrap() as f32).collect())
            .unwrap_or_default();
        assert_eq!(want.len(), u(&case, "steps"), "{name}");
        for (t, &w) in want.iter().enumerate() {
            let got = s.lr(t) as f64;
            assert!(
                (got - w).abs() <= 1e-9 + 2e-7 * w.abs(),
                "{name} step {t}: got {got}, PyTorch {w}"
            );
            if let Some(&m) = metrics.get(t) {
                s.observe(m);
            }
        }
        eprintln!("{name}: {} values match", want.len());
    }
}

#[test]
fn parsed_schedules_and_their_errors() {
    // `cosine` with 9 warmup steps over 109: step s at (s+1)/10 of lr (never 0: the first
    // step moves the weights), then cosine over 100 steps.
    let s = parse_schedule("cosine", 0.1, 109, 9, None).unwrap();
    assert!((s.lr(0) - 0.01).abs() < 1e-8);
    assert!((s.lr(4) - 0.05).abs() < 1e-7);
    assert!((s.lr(8) - 0.09).abs() < 1e-7);
    assert!((s.lr(9) - 0.1).abs() < 1e-7);
    assert!((s.lr(59) - 0.05).abs() < 1e-6);
    assert!(s.lr(108) < 1e-4);
    let s = parse_schedule("cosine", 0.1, 110, 10, None).unwrap();
    assert!((s.lr(10) - 0.1).abs() < 1e-7);
    assert!((s.lr(60) - 0.05).abs() < 1e-6);
    assert!(s.lr(109) < 1e-4);
    let s = parse_schedule("step:size=3,gamma=0.5", 1.0, 100, 0, None).unwrap();
    assert_eq!((s.lr(2), s.lr(3), s.lr(6)), (1.0, 0.5, 0.25));
    // `poly` defaults to power 1, as PyTorch's PolynomialLR: 1 - t/T over 10 steps.
    let s = parse_schedule("poly", 1.0, 10, 0, None).unwrap();
    assert!((s.lr(3) - 0.7).abs() < 1e-7, "{}", s.lr(3));
    let s = parse_schedule("multistep:milestones=2/4", 1.0, 10, 2, Some(0.1)).unwrap();
    // Constant warmup at 0.1 lr for 2 steps, then milestones counted from the end of warmup.
    assert_eq!(s.lr(1), 0.1);
    assert!((s.lr(3) - 1.0).abs() < 1e-7 && (s.lr(4) - 0.1).abs() < 1e-7);
    // A warmup ramps to the schedule's first rate: lr for all but cyclic, whose first rate is
    // its min (lr / 10 by default): 3 steps from a quarter of 0.01 to 0.01, then the cycle.
    let s = parse_schedule("cyclic:up=3", 0.1, 100, 3, None).unwrap();
    let first: Vec<f32> = (0..5).map(|t| s.lr(t)).collect();
    for (got, want) in first.iter().zip([0.0025, 0.005, 0.0075, 0.01, 0.04]) {
        assert!((got - want).abs() < 1e-8, "{first:?}");
    }
    for (spec, needle) in [
        ("cosinus", "expected constant, step"),
        ("step", "schedule step size = (missing): is required"),
        (
            "step:size=3,gama=0.5",
            "schedule step gama = 0.5: unknown key; accepted: size, gamma",
        ),
        ("exp:gamma=abc", "is not a valid number"),
        ("multistep:milestones=5/3", "must increase"),
        ("cyclic:up=0", "schedule cyclic up = 0: must be at least 1"),
        (
            "cyclic:min=0.2,max=0.1",
            "schedule cyclic min = 0.2: needs min < max",
        ),
        (
            "restarts:mult=0",
            "schedule restarts mult = 0: must be at least 1",
        ),
        (
            "restarts:t0=0",
            "schedule restarts t0 = 0: must be at least 1",
        ),
        (
            "cyclic:mode=sawtooth",
            "expected triangular, triangular2 or exp_range",
        ),
        ("onecycle:pct=1.5", "must be in (0, 1)"),
    ] {
        let err = parse_schedule(spec, 0.1, 100, 0, None)
            .err()
            .unwrap_or_else(|| panic!("{spec} accepted"))
            .to_string();
        assert!(err.contains(needle), "{spec}: {err}");
    }
    assert!(parse_schedule("cosine", 0.1, 100, 100, None)
        .err()
        .unwrap()
        .to_string()
        .contains("shorter than the 100 steps"));
    assert!(parse_schedule("onecycle", 0.1, 100, 5, None)
        .err()
        .unwrap()
        .to_string()
        .contains("own warmup"));
    assert!(parse_schedule("cosine", -0.1, 100, 0, None).is_err());
}

#[test]
fn per_batch_or_per_epoch_stepping() {
    assert_eq!(Unit::Batch.step(25, 10), 25);
    assert_eq!(Unit::Epoch.step(25, 10), 2);
}

#[test]
fn linear_scaling_rule() {
    assert_eq!(regimen::optim::scale_lr(0.1, 256, 1024), 0.4);
    assert_eq!(regimen::optim::scale_lr(0.1, 256, 64), 0.025);
}
