//! The `regimen` binary: the main job runs, the summary prints, bad input is one clear line.

use std::process::Command;

fn regimen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn train_prints_epochs_and_learns() {
    let (code, out, err) = regimen(&[
        "--threads",
        "2",
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Linear(64 -> 128)"),
        "the summary comes first:\n{out}"
    );
    let last = out
        .lines()
        .find(|l| l.starts_with("final test accuracy"))
        .expect(&out);
    let acc: f32 = last
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(acc > 85.0, "{last}");
}

#[test]
fn summary_of_the_benchmark_cnn() {
    let (code, out, _) = regimen(&["summary", "--model", "cnn"]);
    assert_eq!(code, 0);
    assert!(out.contains("total: 870826 parameters"), "{out}");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        &["train", "--batch-size", "0"][..],
        &["summary", "--model", "resnet"],
        &["bench", "--workload", "gpt"],
    ] {
        let (code, out, err) = regimen(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
}

#[test]
fn bench_json() {
    let (code, out, err) = regimen(&[
        "--threads",
        "1",
        "bench",
        "--workload",
        "mlp-step",
        "--batch",
        "8",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--reps",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"framework\":\"regimen\"") && out.contains("\"steps_per_s\""),
        "{out}"
    );
}
