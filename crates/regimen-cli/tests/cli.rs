//! The `regimen` binary: the main job runs, the summary prints, bad input is one clear line.

use std::process::Command;

/// The percentage on the "final test accuracy" line of `regimen train`.
fn final_accuracy(out: &str) -> f32 {
    let last = out
        .lines()
        .find(|l| l.starts_with("final test accuracy"))
        .unwrap_or_else(|| panic!("no final accuracy in:\n{out}"));
    last.split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap()
}

/// `regimen train ARGS` must exit 2 with `needle` in its error and nothing on stdout;
/// returns stderr.
fn train_refuses(args: &[&str], needle: &str) -> String {
    let all: Vec<&str> = std::iter::once("train")
        .chain(args.iter().copied())
        .collect();
    let (code, out, err) = regimen(&all);
    assert_eq!(code, 2, "{args:?}: {out}{err}");
    assert!(err.contains(needle) && out.is_empty(), "{args:?}: {err}");
    err
}

/// A folder of this test process for the runs' `runs/` folders (never the source tree).
fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("regimen-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn regimen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args(args)
        .current_dir(scratch())
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
    let acc = final_accuracy(&out);
    assert!(acc > 85.0, "{out}");
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
        &["summary", "--model", "resnot"],
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

#[test]
fn optimizers_and_schedules_from_flags() {
    for args in [
        &[
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--schedule",
            "cosine",
            "--warmup",
            "50",
        ][..],
        &[
            "--momentum",
            "0.9",
            "--nesterov",
            "--lr",
            "0.05",
            "--schedule",
            "onecycle",
            "--weight-decay",
            "5e-4",
        ],
        &[
            "--optimizer",
            "rmsprop",
            "--lr",
            "0.001",
            "--schedule",
            "step:size=2,gamma=0.5",
            "--schedule-unit",
            "epoch",
            "--clip-norm",
            "1",
        ],
        &[
            "--optimizer",
            "adamw",
            "--lr",
            "0.003",
            "--weight-decay",
            "0.05",
            "--amsgrad",
            "--penalty",
            "l1:1e-5",
        ],
    ] {
        let mut all = vec![
            "--threads",
            "1",
            "train",
            "--model",
            "digits-mlp",
            "--epochs",
            "4",
        ];
        all.extend_from_slice(args);
        let (code, out, err) = regimen(&all);
        assert_eq!(code, 0, "{args:?}: {err}");
        let acc = final_accuracy(&out);
        assert!(acc > 85.0, "{args:?}: {out}");
    }
}

#[test]
fn bad_optimizer_and_schedule_flags_are_one_line() {
    for (args, needle) in [
        (
            &["--optimizer", "adamx"][..],
            "expected sgd, adagrad, rmsprop, adam or adamw",
        ),
        (&["--lr=-1"], "lr = -1"),
        (&["--optimizer", "adam", "--beta1", "1.2"], "beta1 = 1.2"),
        (&["--optimizer", "adam", "--eps", "0"], "eps = 0"),
        (&["--schedule", "cosinus"], "schedule = cosinus"),
        (
            &["--schedule", "step:gama=2"],
            "unknown key; accepted: size, gamma",
        ),
        (&["--nesterov"], "nesterov"),
        (&["--warmup", "100000"], "warmup = 100000"),
        (&["--penalty", "l3:0.1"], "penalty = l3:0.1"),
        (&["--clip-norm=-1"], "clip_norm = -1"),
        (&["--schedule-unit", "week"], "expected batch or epoch"),
    ] {
        let err = train_refuses(args, needle);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn data_info_and_preview() {
    let (code, out, err) = regimen(&["data", "info", "--dataset", "digits"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dataset digits from embedded")
            && out.contains("train: 1438 images")
            && out.contains("test: 359 images"),
        "{out}"
    );
    let png = std::env::temp_dir().join(format!("regimen-preview-{}.png", std::process::id()));
    let (code, out, err) = regimen(&[
        "data",
        "preview",
        "--dataset",
        "digits",
        "--augment",
        "crop=1,flip,cutmix=1.0",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CLASS:WEIGHT"), "{out}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    std::fs::remove_file(&png).ok();
    // A missing dataset and a bad pipeline are one line each.
    let empty = std::env::temp_dir().join(format!("regimen-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = regimen(&[
        "data",
        "info",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("fashion-mnist not found") && err.trim().lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = regimen(&[
        "data",
        "preview",
        "--augment",
        "blur",
        "--out",
        "/tmp/x.png",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("augment = blur"), "{err}");
}

#[test]
fn train_with_preprocessing_and_augmentation_flags() {
    let (code, out, err) = regimen(&[
        "--threads",
        "1",
        "train",
        "--dataset",
        "digits",
        "--model",
        "digits-mlp",
        "--epochs",
        "5",
        "--preprocess",
        "per-channel",
        "--augment",
        "translate=1,mixup=0.2",
        "--label-smoothing",
        "0.1",
    ]);
    assert_eq!(code, 0, "{err}");
    let acc = final_accuracy(&out);
    assert!(acc > 70.0, "{out}");
    for (args, needle) in [
        (&["--preprocess", "zca"][..], "preprocess = zca"),
        (&["--augment", "crop=-1"], "augment crop = -1"),
        (&["--label-smoothing", "2"], "label_smoothing = 2"),
        (&["--dataset", "imagenet"], "dataset = imagenet"),
        (&["--model", "resnot"], "unknown layer 'resnot'"),
    ] {
        train_refuses(args, needle);
    }
}

#[test]
fn config_files_set_flags_and_the_command_line_wins() {
    let dir = std::env::temp_dir().join(format!("regimen-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.toml");
    std::fs::write(&path, "model = \"digits-mlp\"\nepochs = 2\nlr = 0.05\nmomentum = 0.9\nnesterov = true\nschedule = \"cosine\"\naugment = \"translate=1,mixup\"\n").unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = regimen(&["--threads", "1", "train", "--config", p]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("augment translate=1,mixup, 2 epochs")
            && out.contains("sgd-nesterov lr 0.05 schedule cosine"),
        "{out}"
    );
    let (code, out, err) = regimen(&[
        "--threads",
        "1",
        "train",
        "--config",
        p,
        "--lr",
        "0.2",
        "--epochs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 epochs") && out.contains("lr 0.2 "), "{out}");
    std::fs::write(dir.join("bad.toml"), "lr = 0.1\nlearning_rate = 3\n").unwrap();
    let (code, _, err) = regimen(&["train", "--config", dir.join("bad.toml").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml") && err.contains("unknown key \"learning_rate\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_save_then_eval_reports_the_same_accuracy() {
    let path = std::env::temp_dir().join(format!(
        "regimen-cli-ckpt-{}.safetensors",
        std::process::id()
    ));
    let p = path.to_str().unwrap();
    let (code, out, err) = regimen(&[
        "--threads",
        "1",
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "2",
        "--preprocess",
        "per-channel",
        "--save",
        p,
    ]);
    assert_eq!(code, 0, "{err}");
    let trained = final_accuracy(&out);
    let (code, out, err) = regimen(&["eval", "--checkpoint", p]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("accuracy {trained:.2}%")),
        "trained {trained}: {out}"
    );
    let (code, _, err) = regimen(&["eval", "--checkpoint", "/nonexistent.safetensors"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.safetensors"), "{err}");
    std::fs::remove_file(&path).ok();
}

/// The same seed gives the same run, bit for bit, on 1 or 2 threads (every reduction adds in a
/// fixed order), and two saves of one run write the same bytes (the header is sorted).
#[test]
fn same_seed_same_bytes_for_any_thread_count() {
    let dir = std::env::temp_dir().join(format!("regimen-det-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |threads: &str, model: &str, name: &str| {
        let path = dir.join(name);
        let (code, _, err) = regimen(&[
            "--threads",
            threads,
            "train",
            "--dataset",
            "digits",
            "--model",
            model,
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--augment",
            "crop=1,flip",
            "--seed",
            "7",
            "--save",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        std::fs::read(path).unwrap()
    };
    for model in ["digits-cnn", "mlp"] {
        let a = run("1", model, &format!("{model}-1.safetensors"));
        let b = run("2", model, &format!("{model}-2.safetensors"));
        let c = run("2", model, &format!("{model}-2b.safetensors"));
        assert!(a == b, "{model}: 1 and 2 threads trained different weights");
        assert!(b == c, "{model}: two runs wrote different bytes");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every value that can fail later is refused before training starts, with one line and exit
/// status 2 (classes 1, 5, 7 and 8 of the reliability review).
#[test]
fn bad_values_are_refused_before_training() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--save", "no/such/dir/m.safetensors"],
            "the folder no/such/dir does not exist",
        ),
        (
            &["--schedule", "cosine:min=-0.05", "--epochs", "3"],
            "the learning rate at step",
        ),
        (&["--epochs", "0"], "invalid --epochs 0"),
        (&["--epochs", "99999999999999"], "invalid --epochs"),
        (&["--workers", "100000"], "invalid --workers 100000"),
        (&["--batch-size", "0"], "invalid --batch-size 0"),
        (
            &["--accumulate", "100000", "--epochs", "1"],
            "no update would ever be applied",
        ),
        (
            &["--augment", "cutout=1000"],
            "the cutout size (1000 pixels) must be smaller",
        ),
        (
            &["--eps", "1e-3"],
            "--eps applies to adagrad, rmsprop, adam and adamw, not sgd",
        ),
        (&["--lr", "-0.1"], "invalid lr = -0.1"),
        (&["--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, needle) in cases {
        let err = train_refuses(args, needle);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
    let (code, _, err) = regimen(&["--threads", "0", "train"]);
    assert!(code == 2 && err.contains("invalid --threads 0"), "{err}");
    let (code, _, err) = regimen(&["--threads", "100000", "train"]);
    assert!(
        code == 2 && err.contains("invalid --threads 100000"),
        "{err}"
    );
}

/// Config files: a bad value names the file and the key; a second --config is refused.
#[test]
fn config_errors_name_the_file_and_the_key() {
    let path = std::env::temp_dir().join(format!("regimen-cfg-{}.toml", std::process::id()));
    std::fs::write(&path, "lr = \"fast\"\n").unwrap();
    let p = path.to_str().unwrap();
    let err = train_refuses(&["--config", p], "lr = \"fast\"");
    assert!(err.contains(p), "{err}");
    train_refuses(&["--config", p, "--config", p], "--config given twice");
    let _ = std::fs::remove_file(&path);
}

/// `regimen ... | head`: a closed pipe ends the output quietly, and --save still happens.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let path =
        std::env::temp_dir().join(format!("regimen-pipe-{}.safetensors", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .current_dir(scratch())
        .args(["train", "--epochs", "3", "--save", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    out.read_exact(&mut first).unwrap();
    drop(out); // the reader goes away, as `head` does
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(path.is_file(), "--save still wrote the model");
    let _ = std::fs::remove_file(&path);
}

/// A diverging run stops at the first non-finite loss with one line naming epoch and step,
/// keeps (and saves) its last finite model, and exits non-zero; that model evaluates.
#[test]
fn divergence_stops_and_keeps_the_last_finite_model() {
    let path = std::env::temp_dir().join(format!("regimen-nan-{}.safetensors", std::process::id()));
    let p = path.to_str().unwrap();
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--lr",
        "1e4",
        "--epochs",
        "5",
        "--save",
        p,
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("training diverged: the loss of step") && err.contains("(epoch "),
        "{err}"
    );
    assert!(out.contains("saved the model"), "{out}");
    let (code, out, err) = regimen(&["eval", "--checkpoint", p]);
    assert_eq!(code, 0, "the kept model is finite: {err}");
    assert!(out.contains("accuracy"), "{out}");
    let _ = std::fs::remove_file(&path);
}

/// A checkpoint whose metadata claims more than its tensors hold is refused before anything
/// the size of the claim is allocated.
#[test]
fn eval_checks_the_metadata_against_the_tensors() {
    let dir = std::env::temp_dir().join(format!("regimen-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.safetensors");
    let (code, _, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--save",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&good).unwrap();
    for (from, to) in [
        ("\"classes\":\"10\"", "\"classes\":\"1000000000000\""),
        (
            "\"input_shape\":\"1,8,8\"",
            "\"input_shape\":\"1,2048,2048\"",
        ),
    ] {
        let text = String::from_utf8_lossy(&bytes[8..]).to_string();
        assert!(text.contains(from), "{from} in the header");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
        let mut new_header = header.replace(from, to);
        while (8 + new_header.len()) % 8 != 0 {
            new_header.push(' ');
        }
        let mut crafted = (new_header.len() as u64).to_le_bytes().to_vec();
        crafted.extend_from_slice(new_header.as_bytes());
        crafted.extend_from_slice(&bytes[8 + header_len..]);
        let path = dir.join("crafted.safetensors");
        std::fs::write(&path, crafted).unwrap();
        let (code, _, err) = regimen(&["eval", "--checkpoint", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("but the file holds") || err.contains("at most 16777216 classes"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
