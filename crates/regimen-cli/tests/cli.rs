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
    // A spec on a given input shape and class count.
    let (code, out, err) = regimen(&[
        "summary",
        "--model",
        "conv:8,relu,gap,linear:classes",
        "--input",
        "3,32,32",
        "--classes",
        "7",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("[8, 32, 32]") && out.contains("Linear(8 -> 7)"),
        "{out}"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        &["train", "--batch-size", "0"][..],
        &["summary", "--model", "resnot"],
        &["summary", "--input", "3,x"],
        &["bench", "--workload", "gpt"],
        &["bench", "--kernels"],
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
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["framework"], "regimen", "{out}");
    assert!(v["steps_per_s"].as_f64().unwrap() > 0.0, "{out}");
    // The products' multiply-adds (two FLOPs each), the bias additions and the two ReLUs.
    assert_eq!(
        v["forward_flops_per_sample"].as_u64(),
        Some(2 * (784 * 512 + 512 * 512 + 512 * 10) + (512 + 512 + 10) + (512 + 512)),
        "{out}"
    );
    assert!(
        v["cpu_kernels"].as_str().is_some_and(|s| !s.is_empty()),
        "{out}"
    );
    // The per-layer profile of a model whose first layer has no parameters (Flatten).
    for w in ["mlp-step", "cnn-step"] {
        let (code, out, err) = regimen(&[
            "--threads",
            "1",
            "bench",
            "--workload",
            w,
            "--batch",
            "4",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--reps",
            "1",
            "--profile",
        ]);
        assert_eq!(code, 0, "{w}: {err}");
        assert!(out.contains("step total (ms)"), "{w}: {out}");
    }
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
    // What train refuses on these images, preview refuses too, in the user's words.
    let (code, _, err) = regimen(&[
        "data",
        "preview",
        "--augment",
        "cutout=10",
        "--out",
        "/tmp/x.png",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("augment = cutout=10: the cutout size (10 pixels)"),
        "{err}"
    );
    let (code, _, err) = regimen(&["data", "preview", "--out", "/tmp/x.jpg"]);
    assert_eq!(code, 2);
    assert!(err.contains("give a name ending in .png"), "{err}");
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

/// The fused passes (batch norm + ReLU + pool in digits-cnn; linear + ReLU + dropout in the
/// mlp) train the same weights, bit for bit, as the layers one by one (`REGIMEN_FUSION=0`).
#[test]
fn fusion_off_trains_the_same_bytes() {
    let dir = std::env::temp_dir().join(format!("regimen-fusion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |model: &str, fusion: bool| {
        let path = dir.join(format!("{model}-{fusion}.safetensors"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_regimen"));
        c.args([
            "train",
            "--dataset",
            "digits",
            "--model",
            model,
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--seed",
            "7",
            "--save",
        ])
        .arg(&path)
        .current_dir(&dir);
        if !fusion {
            c.env("REGIMEN_FUSION", "0");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read(path).unwrap()
    };
    for model in ["digits-cnn", "mlp"] {
        assert!(
            run(model, true) == run(model, false),
            "{model}: the fused passes trained different weights"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--precision bf16` trains digits-cnn (bf16 products and activations through convolutions,
/// batch norm and the linear layer) to the f32 run's accuracy within a point, with weights of
/// its own (the bf16 path ran).
#[test]
fn bf16_trains_as_well_as_f32() {
    let dir = std::env::temp_dir().join(format!("regimen-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |precision: &str| {
        let path = dir.join(format!("{precision}.safetensors"));
        let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "digits-cnn",
                "--epochs",
                "3",
                "--batch-size",
                "64",
                "--seed",
                "7",
                "--precision",
                precision,
                "--save",
            ])
            .arg(&path)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let acc: f64 = text
            .split("final test accuracy ")
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no final accuracy in {text}"));
        (acc, tensors(&path))
    };
    let ((a32, w32), (a16, w16)) = (run("f32"), run("bf16"));
    assert_eq!(w32.len(), w16.len());
    assert!(w32 != w16, "bf16 trained the f32 weights");
    assert!(a32 > 50.0, "f32 learned: {a32}%");
    assert!((a32 - a16).abs() <= 1.0, "f32 {a32}% vs bf16 {a16}%");
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
        // clap's tip survives, and the negative-number hint only comes for a number.
        (&["--epoch", "3"], "similar argument exists: '--epochs'"),
        (
            &["--beta1", "0.5"],
            "--beta1 and --beta2 apply to adam and adamw, not sgd",
        ),
        (&["--warmup-factor", "0.1"], "give --warmup N too"),
        (
            &["--preprocess", "pca:10"],
            "turns each image into 10 features, which a convolutional model cannot take",
        ),
    ];
    for (args, needle) in cases {
        let err = train_refuses(args, needle);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
    // --out into a folder of other files (not a run) is refused: nothing is overwritten.
    let proj = std::env::temp_dir().join(format!("regimen-proj-{}", std::process::id()));
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("config.toml"), "# mine\n").unwrap();
    train_refuses(
        &["--out", proj.to_str().unwrap()],
        "is not empty (config.toml and maybe more) and holds no run",
    );
    assert_eq!(
        std::fs::read_to_string(proj.join("config.toml")).unwrap(),
        "# mine\n"
    );
    // ... but a folder that holds only the run's own --config is the run's, and a run's folder
    // left by an error before its first checkpoint is reused.
    std::fs::write(
        proj.join("config.toml"),
        "model = \"digits-mlp\"\nepochs = 1\n",
    )
    .unwrap();
    let (code, out, err) = regimen(&[
        "train",
        "--config",
        proj.join("config.toml").to_str().unwrap(),
        "--out",
        proj.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_dir_all(&proj);
    train_refuses(
        &["--out", proj.to_str().unwrap(), "--accumulate", "100000"],
        "no update would ever be applied",
    );
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--out",
        proj.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "after an error: {out}{err}");
    let _ = std::fs::remove_dir_all(&proj);
    let err = train_refuses(&["--epoch", "3"], "--epochs");
    assert!(!err.contains("negative number"), "{err}");
    // Missing arguments are named; a command without its subcommand shows them.
    let (code, _, err) = regimen(&["predict", "--checkpoint", "x"]);
    assert!(code == 2 && err.contains("not provided: <INPUTS>"), "{err}");
    let (code, _, err) = regimen(&["sweep"]);
    assert!(code == 2 && err.contains("--space"), "{err}");
    let (code, _, err) = regimen(&["data"]);
    assert!(code == 2 && err.contains("preview"), "{err}");
    // A switch in a config file takes true or false, and the error names the key.
    let cfg = std::env::temp_dir().join(format!("regimen-switch-{}.toml", std::process::id()));
    std::fs::write(&cfg, "nesterov = \"yes\"\n").unwrap();
    train_refuses(
        &["--config", cfg.to_str().unwrap()],
        "nesterov = \"yes\": expected true or false",
    );
    let _ = std::fs::remove_file(&cfg);
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
    train_refuses(&["--resume", "a", "--resume=b"], "--resume given 2 times");
    // One setting under both spellings.
    std::fs::write(&path, "batch_size = 64\nbatch-size = 128\n").unwrap();
    train_refuses(&["--config", p], "are the same setting");
    // A value out of range, from the file alone: the file and its key are named; from the
    // command line, the flag alone.
    std::fs::write(&path, "threads = 0\n").unwrap();
    train_refuses(
        &["--config", p],
        &format!("config {p}: threads = 0: invalid --threads 0: must be from 1"),
    );
    let err = train_refuses(&["--config", p, "--threads", "0"], "invalid --threads 0");
    assert!(!err.contains("config "), "{err}");
    // A flag of the command line whose name begins with a key of the file (--lr-batch, lr)
    // is not blamed on the file.
    std::fs::write(&path, "lr = 0.1\n").unwrap();
    let err = train_refuses(&["--config", p, "--lr-batch", "abc"], "--lr-batch");
    assert!(!err.contains("config "), "{err}");
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

/// `regimen ... 2>&1 | head`: a closed standard error is not a panic either; the run's own
/// exit status comes through (here the one-line error of a bad flag, exit 2, not 101).
#[test]
fn a_closed_standard_error_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // every write to standard error now fails (EPIPE)
    let status = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .current_dir(scratch())
        .args(["train", "--lr", "-1"])
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2), "{status}");
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
    // Where the run stands: no checkpoint yet when the first epoch diverged.
    if err.contains("(epoch 1)") {
        assert!(err.contains("no epoch finished"), "{err}");
    } else {
        assert!(err.contains("the last good checkpoint is"), "{err}");
    }
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

/// The tensors of a safetensors file, by name (metadata left out).
fn tensors(path: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let (t, _) = regimen::io::read_safetensors(path).unwrap();
    t.into_iter()
        .map(|(n, s, v)| (n, s, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// A run folder holds the resolved config, the metrics, the checkpoints, the plots, the
/// TensorBoard events and the summary; its config.toml rebuilds the same run.
#[test]
fn the_run_folder_and_its_config_rebuild_the_run() {
    let dir = scratch().join(format!("runfolder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = dir.join("a");
    let (code, out, err) = regimen(&[
        "--threads",
        "2",
        "train",
        "--model",
        "flatten,linear:32,relu,dropout:0.1,linear:classes",
        "--epochs",
        "3",
        "--augment",
        "translate=1",
        "--schedule",
        "cosine",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for f in [
        "config.toml",
        "metrics.csv",
        "summary.json",
        "loss.png",
        "accuracy.png",
        "lr.png",
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
    ] {
        assert!(a.join(f).is_file(), "{f} in the run folder");
    }
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("epoch,step,train_loss,train_acc,val_loss,val_acc,gap,lr"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let test_acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(
        (test_acc * 100.0 - final_accuracy(&out) as f64).abs() < 0.006,
        "{summary}"
    );
    assert!(std::fs::read_dir(&a).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tfevents")));
    // The same config, another folder: the same weights and optimizer state.
    let b = dir.join("b");
    let (code, _, err) = regimen(&[
        "--threads",
        "1",
        "train",
        "--config",
        a.join("config.toml").to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let last = "checkpoints/last.safetensors";
    assert_eq!(tensors(&a.join(last)), tensors(&b.join(last)));
    // A folder that holds a run is not overwritten.
    let (code, _, err) = regimen(&["train", "--epochs", "1", "--out", a.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    // Its best checkpoint removed, the finished run resumed (evaluated) says it is missing,
    // and summary.json does not point at it.
    std::fs::remove_file(a.join("checkpoints/best.safetensors")).unwrap();
    let (code, out, err) = regimen(&["train", "--resume", a.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("best epoch") && out.contains("best.safetensors is missing"),
        "{out}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    assert!(summary["checkpoints"]["best"].is_null(), "{summary}");
    assert!(summary["checkpoints"]["last"].is_string(), "{summary}");
    // A config.toml edited after the checkpoint is refused by --resume, naming the key.
    let config = std::fs::read_to_string(a.join("config.toml")).unwrap();
    let edited = config.replace("\nlr = 0.1\n", "\nlr = 0.5\n");
    assert_ne!(edited, config, "the config has an lr line: {config}");
    std::fs::write(a.join("config.toml"), edited).unwrap();
    let (code, _, err) = regimen(&["train", "--resume", a.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.toml sets lr = 0.5, but the run was trained with lr = 0.1"),
        "{err}"
    );
    std::fs::write(a.join("config.toml"), config).unwrap();
    // `eval` of the folder points at the checkpoint there is.
    let (code, _, err) = regimen(&["eval", a.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no best checkpoint") && err.contains("last.safetensors"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An interrupt in the middle of an epoch writes a checkpoint that `--resume` continues bit
/// for bit where the uninterrupted run ends (dropout, augmentation with Mixup, a schedule).
#[test]
fn interrupt_then_resume_equals_the_uninterrupted_run() {
    let dir = scratch().join(format!("resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "train",
            "--model",
            "conv:8,bn,relu,dropout:0.2,maxpool:2,flatten,linear:classes",
            "--epochs",
            "4",
            "--augment",
            "crop=1,flip,mixup=0.2",
            "--schedule",
            "cosine",
            "--momentum",
            "0.9",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = dir.join("full");
    let a = args(&full);
    let (code, _, err) = regimen(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let part = dir.join("part");
    let a = args(&part);
    let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args(&a)
        .env("REGIMEN_INTERRUPT_AT_STEP", "60")
        .current_dir(scratch())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(
        stdout.contains("interrupted in epoch 2 before batch 19")
            && stdout.contains(&format!("regimen train --resume {}", part.display())),
        "{stdout}"
    );
    // Only a few flags may change on resume.
    let (code, _, err) = regimen(&["train", "--resume", part.to_str().unwrap(), "--lr", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--lr cannot change when resuming"), "{err}");
    // Nor through a config file's `resume` key.
    let cfg = dir.join("resume.toml");
    std::fs::write(
        &cfg,
        format!("resume = {:?}\nlr = 0.7\n", part.to_str().unwrap()),
    )
    .unwrap();
    let (code, _, err) = regimen(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("resume cannot be set in a config file"),
        "{err}"
    );
    // A run planned for 4 epochs is not cut to 3 half-way (its schedule is planned for 4).
    let (code, _, err) = regimen(&["train", "--resume", part.to_str().unwrap(), "--epochs", "3"]);
    assert_eq!(code, 2);
    assert!(err.contains("can be lengthened, not shortened"), "{err}");
    let (code, out, err) = regimen(&["train", "--resume", part.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("at batch 19 of epoch 2"), "{out}");
    let last = "checkpoints/last.safetensors";
    assert_eq!(tensors(&full.join(last)), tensors(&part.join(last)));
    let cols = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(8).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(cols(&full), cols(&part));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C (SIGINT) stops after the current step, writes the checkpoint and says how to resume.
#[test]
fn ctrl_c_writes_a_resumable_checkpoint() {
    let dir = scratch().join(format!("sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args([
            "train",
            "--model",
            "digits-mlp",
            "--epochs",
            "100000",
            "--out",
        ])
        .arg(&dir)
        .current_dir(scratch())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first epoch's row, then interrupt.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(dir.join("metrics.csv"))
        .map(|s| s.lines().count() > 2)
        .unwrap_or(false)
    {
        assert!(start.elapsed().as_secs() < 60, "no epoch in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stdout}{stderr}");
    assert!(
        stderr.contains("interrupt: stopping after this step"),
        "{stderr}"
    );
    assert!(stdout.contains("regimen train --resume"), "{stdout}");
    // The checkpoint resumes (here with a shorter run, which then just tests).
    let (code, out, err) = regimen(&["train", "--resume", dir.to_str().unwrap(), "--epochs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resuming"), "{out}");
    // Evaluated before its end: summary.json does not call it completed.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let ending = summary["ending"].as_str().unwrap();
    assert!(
        ending.starts_with("evaluated after ")
            && ending.contains("of its 100000 epochs (not completed)"),
        "{ending}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// kill -9 at random moments of a run (checkpoints are written after every epoch) never
/// leaves an unloadable checkpoint: each time, the last one evaluates and the run resumes.
#[test]
fn kill_9_never_leaves_a_broken_checkpoint() {
    let dir = scratch().join(format!("kill9-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let last = dir.join("checkpoints/last.safetensors");
    let mut rng = regimen::Rng::new(11);
    let mut evaluated = 0;
    for i in 0..12 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regimen"));
        if i == 0 || !last.is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            cmd.args([
                "train",
                "--model",
                "digits-mlp",
                "--epochs",
                "100000",
                "--out",
            ])
            .arg(&dir);
        } else {
            cmd.args(["train", "--resume"]).arg(&dir);
        }
        let mut child = cmd
            .current_dir(scratch())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ms = 150 + (rng.next_f64() * 500.0) as u64;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if last.is_file() {
            let (code, out, err) = regimen(&["eval", last.to_str().unwrap()]);
            assert_eq!(code, 0, "after kill {i}: {out}{err}");
            evaluated += 1;
        }
    }
    assert!(
        evaluated >= 8,
        "most kills came after a checkpoint: {evaluated}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ensembles of snapshots in `eval`; `predict` on PNG and IDX images.
#[test]
fn eval_an_ensemble_and_predict_images() {
    let dir = scratch().join(format!("ensemble-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "flatten,linear:64,relu,linear:classes",
        "--epochs",
        "6",
        "--schedule",
        "restarts:t0=2",
        "--schedule-unit",
        "epoch",
        "--snapshots",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let snaps: Vec<String> = [2, 4, 6]
        .iter()
        .map(|e| {
            let p = dir.join(format!("checkpoints/snapshot-epoch-{e}.safetensors"));
            assert!(p.is_file(), "{}", p.display());
            p.display().to_string()
        })
        .collect();
    let mut args = vec!["eval"];
    args.extend(snaps.iter().map(String::as_str));
    let (code, out, err) = regimen(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("accuracy")).count(),
        4,
        "{out}"
    );
    assert!(
        out.contains("ensemble of 3 (probabilities averaged)"),
        "{out}"
    );

    // A PNG (RGB, converted to grey) and an IDX file of two images.
    let mut c = regimen::png::Canvas::new(8, 8, [0, 0, 0]);
    for y in 1..7 {
        c.set(3, y, [255, 255, 255]);
        c.set(4, y, [255, 255, 255]);
    }
    let png = dir.join("one.png");
    c.save(&png).unwrap();
    let idx = dir.join("two-idx3-ubyte");
    regimen::data::idx::write(&idx, &[2, 8, 8], &[7u8; 128]).unwrap();
    let (code, out, err) = regimen(&[
        "predict",
        "--checkpoint",
        dir.to_str().unwrap(),
        png.to_str().unwrap(),
        idx.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{out}");
    for r in rows {
        let p: Vec<f64> = r["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(p.len(), 10);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{r}");
        let class = r["class"].as_u64().unwrap() as usize;
        assert!(p.iter().all(|&x| x <= p[class]), "{r}");
    }
    assert_eq!(
        rows[1]["probabilities"], rows[2]["probabilities"],
        "identical images"
    );
    let (code, out, _) = regimen(&[
        "predict",
        "--checkpoint",
        dir.to_str().unwrap(),
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("input,class,name,probability,p_0,"),
        "{out}"
    );
    // A wrong size is one line naming the file.
    let big = dir.join("big.png");
    regimen::png::Canvas::new(9, 8, [0, 0, 0])
        .save(&big)
        .unwrap();
    let (code, _, err) = regimen(&[
        "predict",
        "--checkpoint",
        dir.to_str().unwrap(),
        big.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("big.png: the image is 8x9, the model takes 8x8"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad model specs, config keys, flags and missing data: one line, exit status 2.
#[test]
fn bad_specs_keys_flags_and_data_are_one_line() {
    let dir = scratch().join(format!("bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "epochs = 2\nlearning_rate = 0.1\n").unwrap();
    let dup = dir.join("dup.toml");
    std::fs::write(&dup, "lr = 0.1\nlr = 0.2\n").unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, "").unwrap();
    let into_file = file.join("x.safetensors");
    for (args, needle) in [
        (
            vec!["--config", dup.to_str().unwrap()],
            "dup.toml line 2, column 1: duplicate key",
        ),
        (
            vec!["--save", into_file.to_str().unwrap()],
            "a-file is not a folder",
        ),
        (
            vec!["--model", "flatten,linear:10,leaky_relu:NaN,linear:classes"],
            "leaky_relu:NaN: the parameter after ':' must be a finite number",
        ),
        (
            vec!["--model", "digits-mlp,init=he,init=xavier"],
            "init= given twice",
        ),
        (
            vec!["--model", "digits-mlp,init=uniform:1:0"],
            "needs LO <= HI",
        ),
        (vec!["--augment", "flip,"], "an empty item"),
        (
            vec!["--schedule", "step:size=5,size=6"],
            "schedule step size = 6: given twice",
        ),
        (
            vec!["--schedule", "restarts:mult=0"],
            "schedule restarts mult = 0: must be at least 1",
        ),
        (
            // 10^13 parameters: refused before anything is allocated.
            vec!["--model", "deep-mlp:1000:100000"],
            "this machine has",
        ),
        (
            vec!["--model", "conv:8,relu,linear:classes"],
            "model spec token 3 = linear:classes: a linear layer takes flat features",
        ),
        (
            vec!["--model", "flatten,linear:10,dropout:2"],
            "model spec token 3 = dropout:2",
        ),
        (
            vec!["--model", "flatten,linear:12"],
            "the data has 10 classes",
        ),
        (
            vec!["--model", "deep-mlp:0"],
            "model spec token 1 = deep-mlp:0",
        ),
        (
            vec!["--config", cfg.to_str().unwrap()],
            "unknown key \"learning_rate\"",
        ),
        (
            vec!["--learning-rate", "0.1"],
            "unexpected argument '--learning-rate'",
        ),
        (vec!["--monitor", "val_f1"], "invalid --monitor \"val_f1\""),
        (
            vec!["--early-stopping", "3", "--validation", "0"],
            "needs a validation split",
        ),
        (vec!["--validation", "0.95"], "invalid --validation 0.95"),
        (
            vec![
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                "/nonexistent/fmnist",
            ],
            "fashion-mnist",
        ),
        (
            vec!["--resume", "/nonexistent/run"],
            "no /nonexistent/run/config.toml",
        ),
    ] {
        let mut all = vec!["train"];
        all.extend(args.iter().copied());
        let out_dir = dir.join("out");
        let o = out_dir.to_str().unwrap().to_string();
        if !args.contains(&"--resume") {
            all.extend(["--out", o.as_str()]);
        }
        let (code, out, err) = regimen(&all);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A last batch of one sample cannot go through batch norm over features: refused before
/// training, and the run folder the refused run had created is gone again.
#[test]
fn a_last_batch_of_one_sample_for_feature_batch_norm_is_refused() {
    let out = scratch().join(format!("bn-one-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // digits: 1294 training images after the validation split, 3 x 431 + 1.
    let (code, _, err) = regimen(&[
        "train",
        "--model",
        "flatten,linear:32,bn,relu,linear:classes",
        "--batch-size",
        "431",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the last batch of each epoch holds 1 of the 1294 training images"),
        "{err}"
    );
    assert!(!out.exists(), "the refused run's folder is removed");
    // Batch norm over images takes it (one sample still has H x W values per channel).
    let (code, _, err) = regimen(&[
        "train",
        "--model",
        "conv:4,bn,relu,flatten,linear:classes",
        "--batch-size",
        "431",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// lab and predict refuse data they cannot read instead of falling back or misnaming it.
#[test]
fn lab_and_predict_refuse_what_they_cannot_read() {
    let dir = scratch().join(format!("refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (code, _, err) = regimen(&[
        "lab",
        "activations",
        "--quick",
        "--data-dir",
        "/nonexistent",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--quick runs on the embedded digits"), "{err}");
    let out = dir.join("lab");
    let (code, _, err) = regimen(&[
        "lab",
        "activations",
        "--data-dir",
        "/nonexistent/fmnist",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fashion-mnist not found"), "{err}");
    let run = dir.join("run");
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // A train run's folder is not a lab report's or a sweep's to write into.
    let (code, _, err) = regimen(&[
        "lab",
        "activations",
        "--quick",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a lab report's folder"), "{err}");
    let space = dir.join("space.toml");
    std::fs::write(&space, "lr = \"log_uniform(1e-2, 0.1)\"\n").unwrap();
    let (code, _, err) = regimen(&[
        "sweep",
        "--space",
        space.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a sweep's folder"), "{err}");
    // Members of an ensemble trained on different datasets (their classes need not mean the
    // same): refused, as eval refuses them.
    let fashion = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    if fashion.is_dir() {
        let other = dir.join("other");
        let (code, out, err) = regimen(&[
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            fashion.to_str().unwrap(),
            "--model",
            "flatten,linear:10,relu,linear:classes",
            "--epochs",
            "1",
            "--out",
            other.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let (code, _, err) = regimen(&[
            "predict",
            "--checkpoint",
            run.to_str().unwrap(),
            "--checkpoint",
            other.to_str().unwrap(),
            "/nonexistent.png",
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("an ensemble's members must share one dataset"),
            "{err}"
        );
    } else {
        eprintln!("the mixed-dataset ensemble case skipped: no Fashion-MNIST");
    }
    let text = dir.join("text.png");
    std::fs::write(&text, "hi\n").unwrap();
    let (code, _, err) = regimen(&[
        "predict",
        "--checkpoint",
        run.to_str().unwrap(),
        text.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("neither a PNG image nor an IDX image file")
            && err.contains("starts with bytes 68690a"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `regimen lab`: the list, one experiment into a Markdown and a self-contained HTML report.
#[test]
fn lab_list_and_a_quick_experiment() {
    let (code, out, _) = regimen(&["lab", "list"]);
    assert_eq!(code, 0);
    for name in [
        "activations",
        "activation-functions",
        "preprocessing",
        "init",
        "learning-rate",
        "optimizers",
        "regularization",
        "augmentation",
        "fitting",
        "ensembles",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "{name} in:\n{out}"
        );
    }
    let dir = scratch().join(format!("lab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, err) = regimen(&[
        "lab",
        "optimizers",
        "--quick",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let figures = md.matches("![").count();
    assert!(figures >= 4, "{md}");
    assert_eq!(
        html.matches("src=\"data:image/png;base64,").count(),
        figures
    );
    for line in md.lines().filter(|l| l.starts_with("![")) {
        let file = line.split("](").nth(1).unwrap().trim_end_matches(')');
        assert!(dir.join(file).is_file(), "{file}");
    }
    let (code, _, err) = regimen(&["lab", "nonsense"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown experiment \"nonsense\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `regimen lr-find`: the range test writes its CSV and plot, prints the two suggestions and
/// writes the steepest one into a config with --apply.
#[test]
fn lr_find_suggests_and_applies() {
    let dir = scratch().join(format!("lrfind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "# my recipe\nepochs = 3\nlr = 0.5 # to be found\nmodel = \"digits-mlp\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let (code, stdout, err) = regimen(&[
        "lr-find",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "120",
        "--out",
        out.to_str().unwrap(),
        "--apply",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("suggestion (steepest descent"), "{stdout}");
    assert!(
        stdout.contains("suggestion (the minimum of the smoothed loss, divided by 10)"),
        "{stdout}"
    );
    assert!(out.join("lr-find.png").is_file());
    let csv = std::fs::read_to_string(out.join("lr-find.csv")).unwrap();
    assert!(
        csv.starts_with("step,lr,loss,smoothed_loss\n") && csv.lines().count() > 20,
        "{csv}"
    );
    let applied = std::fs::read_to_string(&cfg).unwrap();
    // Only the lr line changed: comments and order stay.
    let lines: Vec<&str> = applied.lines().collect();
    assert_eq!(lines.len(), 4, "{applied}");
    assert_eq!(
        (lines[0], lines[1], lines[3]),
        ("# my recipe", "epochs = 3", "model = \"digits-mlp\""),
        "{applied}"
    );
    assert!(
        lines[2].starts_with("lr = ") && !lines[2].contains("0.5"),
        "{applied}"
    );
    // The config with the applied rate trains.
    let (code, _, err) = regimen(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        dir.join("t").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for end in ["0.1", "1e40"] {
        let (code, _, err) = regimen(&["lr-find", "--start", "1", "--end", end]);
        assert_eq!(code, 2, "{end}");
        assert!(err.contains("need 0 < start < end"), "{end}: {err}");
    }
    // Ctrl-C ends a long range test after its current step: the steps so far are written and
    // plotted, nothing is applied, the exit status is 130.
    let before = std::fs::read_to_string(&cfg).unwrap();
    let long = dir.join("long");
    let child = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args([
            "lr-find", "--start", "1e-7", "--end", "1e-3", "--steps", "100000",
        ])
        .args([
            "--model",
            "flatten,linear:1024,relu,linear:1024,relu,linear:classes",
        ])
        .args(["--out", long.to_str().unwrap()])
        .args(["--apply", cfg.to_str().unwrap()])
        .current_dir(scratch())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first line comes just before the test starts; a second later it is running.
    let mut child = child;
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    while !first.contains("range test:") {
        let n = std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
        assert!(n > 0, "no range test started: {first}");
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let done = child.wait_with_output().unwrap();
    let (stdout, stderr) = (first + &rest, String::from_utf8_lossy(&done.stderr));
    assert_eq!(done.status.code(), Some(130), "{stdout}{stderr}");
    assert!(
        stderr.contains("interrupt: ending the range test"),
        "{stderr}"
    );
    assert!(
        stdout.contains("(interrupted)") && stdout.contains("not applied"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(long.join("lr-find.csv")).unwrap();
    assert!(csv.lines().count() > 2, "{csv}");
    assert!(long.join("lr-find.png").is_file());
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        before,
        "--apply left alone"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `regimen sweep`: successive halving over a small space; a leaderboard, plots and the best
/// config; a killed sweep resumes without rerunning finished trials; bad spaces are one line.
#[test]
fn sweep_runs_resumes_and_refuses_bad_spaces() {
    let dir = scratch().join(format!("sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let space = dir.join("space.toml");
    std::fs::write(&space, "lr = \"log_uniform(1e-3, 0.5)\"\nbatch_size = \"choice(32, 64)\"\nmodel = \"choice('digits-mlp', 'flatten,linear:32,relu,linear:classes')\"\n").unwrap();
    let base = dir.join("base.toml");
    std::fs::write(&base, "epochs = 2\nvalidation = 0.2\n").unwrap();
    let out = dir.join("s");
    let args = [
        "sweep",
        "--space",
        space.to_str().unwrap(),
        "--config",
        base.to_str().unwrap(),
        "--trials",
        "4",
        "--jobs",
        "2",
        "--eta",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    // Killed (the whole process group, as Ctrl-C in a terminal) once the first trial has finished.
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args(args)
        .process_group(0)
        .current_dir(scratch())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let done = || -> Vec<(usize, usize)> {
        let Ok(text) = std::fs::read_to_string(out.join("sweep.json")) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        v["trials"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| {
                let id = t["id"].as_u64().unwrap() as usize;
                t["runs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |r| (id, r["epochs"].as_u64().unwrap() as usize))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    while done().is_empty() {
        assert!(start.elapsed().as_secs() < 120, "no trial finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // `--` before the negative process-group id: procps-ng 4.0's `kill -9 -PGID` reads only the
    // first digit of the id (`-22073` becomes -2, and `-13494` becomes -1: every process).
    let ok = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(ok.success());
    child.wait().unwrap();
    let first = done();
    let (id, e) = first[0];
    let summary = out.join(format!("trials/trial-{id:03}-e{e}/summary.json"));
    let stamp = std::fs::metadata(&summary).unwrap().modified().unwrap();
    let (code, stdout, err) = regimen(&args);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("resuming the sweep"), "{stdout}");
    assert_eq!(
        std::fs::metadata(&summary).unwrap().modified().unwrap(),
        stamp,
        "not rerun"
    );
    // 4 trials at 1 epoch, the best 2 at 2 epochs.
    let all = done();
    assert_eq!(all.iter().filter(|r| r.1 == 1).count(), 4, "{all:?}");
    assert_eq!(all.iter().filter(|r| r.1 == 2).count(), 2, "{all:?}");
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(
        md.contains("| rank | trial | batch_size | lr | model |"),
        "{md}"
    );
    assert!(out.join("leaderboard.csv").is_file() && out.join("sweep-lr.png").is_file());
    let best = std::fs::read_to_string(out.join("best.toml")).unwrap();
    assert!(
        best.contains("epochs = 2") && best.contains("lr = "),
        "{best}"
    );
    let (code, _, err) = regimen(&[
        "train",
        "--config",
        out.join("best.toml").to_str().unwrap(),
        "--out",
        dir.join("best-run").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "the best config trains: {err}");
    // A second run of the finished sweep reruns nothing either.
    let (code, stdout, _) = regimen(&args);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("rung 2: 2 trials at 2 epochs (2 already done)"),
        "{stdout}"
    );
    for (text, needle) in [
        (
            "learning_rate = \"log_uniform(1e-3, 1)\"",
            "learning_rate: not a train setting",
        ),
        (
            "lr = \"log_uniform(0, 1)\"",
            "lr: log_uniform needs bounds > 0",
        ),
        (
            "optimizer = \"choice()\"",
            "optimizer: choice needs at least one value",
        ),
        ("lr = 0.1", "lr: expected a string"),
        (
            "batch_size = \"uniform(16, 64)\"",
            "batch_size: the drawn value",
        ),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let (code, out2, err) = regimen(&[
            "sweep",
            "--space",
            bad.to_str().unwrap(),
            "--out",
            dir.join("x").to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{text}: {out2}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("bad.toml") && err.contains(needle),
            "{text}: {err}"
        );
    }
    // Values only train knows to refuse, and a bad base config: every trial's settings are
    // checked as train would before any starts, and nothing is saved (the same folder takes
    // the fixed sweep).
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "momentum = \"uniform(1.1, 2)\"").unwrap();
    let bad_base = dir.join("bad-base.toml");
    std::fs::write(&bad_base, "epochs = 2\nlearning_rate = 0.1\n").unwrap();
    let good_space = dir.join("good.toml");
    std::fs::write(&good_space, "lr = \"log_uniform(1e-2, 0.1)\"\n").unwrap();
    for (space, base, needle) in [
        (&bad, None, "invalid momentum"),
        (
            &good_space,
            Some(&bad_base),
            "unknown key \"learning_rate\"",
        ),
    ] {
        let y = dir.join("y");
        let mut args = vec![
            "sweep",
            "--space",
            space.to_str().unwrap(),
            "--trials",
            "2",
            "--out",
            y.to_str().unwrap(),
        ];
        if let Some(b) = base {
            args.extend(["--config", b.to_str().unwrap()]);
        }
        let (code, out2, err) = regimen(&args);
        assert_eq!(code, 2, "{out2}{err}");
        assert!(
            err.contains("no trial was started") && err.contains(needle),
            "{err}"
        );
        assert!(!y.join("sweep.json").exists() && !y.join("trials").exists());
    }
    let (code, _, err) = regimen(&[
        "sweep",
        "--space",
        good_space.to_str().unwrap(),
        "--config",
        bad_base.to_str().unwrap(),
        "--min-epochs",
        "5",
        "--out",
        dir.join("z").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid --min-epochs 5: must be from 1 to the config's epochs (2)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Started by a launcher with several ranks, a build without the `distributed` feature says so
/// in one line and trains nothing (rather than N copies of one run); other commands than train
/// and bench are refused on several ranks by any build.
#[test]
fn several_ranks_without_the_feature_are_refused() {
    let run = |args: &[&str], var: &str| {
        Command::new(env!("CARGO_BIN_EXE_regimen"))
            .args(args)
            .env(var, "4")
            .current_dir(scratch())
            .output()
            .unwrap()
    };
    let out = run(&["eval", "x.safetensors"], "PMI_SIZE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("started with 4 ranks: only `regimen train`"),
        "{err}"
    );
    if cfg!(feature = "distributed") {
        return;
    }
    let out = run(
        &["train", "--model", "digits-mlp", "--epochs", "1"],
        "OMPI_COMM_WORLD_SIZE",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("4 ranks") && err.contains("without the `distributed` feature"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A relative `--data-dir` is written to the run's config as an absolute path, so that the
/// run resumes (or repeats with `--config`) from any folder; `--resume` takes `--data-dir`
/// for files that moved.
#[test]
fn a_relative_data_dir_is_kept_absolute() {
    let dir = scratch().join(format!("datadir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args([
            "train",
            "--model",
            "digits-mlp",
            "--epochs",
            "1",
            "--data-dir",
            "data",
            "--out",
            "run",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    // The embedded digits read no folder: said, not silently ignored.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not read: digits is embedded"),
        "{stderr}"
    );
    let config = std::fs::read_to_string(dir.join("run/config.toml")).unwrap();
    let want = format!(
        "data_dir = {:?}",
        std::fs::canonicalize(dir.join("data"))
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert!(config.contains(&want), "{config}");
    let run = dir.join("run");
    let (code, out, err) = regimen(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        "2",
        "--data-dir",
        dir.join("data").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A resume reads the data the run was trained on: the same files moved are taken, other
/// files (here one more training image) are refused before anything trains, naming both.
#[test]
fn a_resume_on_other_data_is_refused() {
    let dir = scratch().join(format!("otherdata-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fake = |name: &str, train: usize| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut r = regimen::Rng::new(3);
        for (prefix, n) in [("train", train), ("t10k", 20)] {
            let pixels: Vec<u8> = (0..n * 784).map(|_| r.below(256) as u8).collect();
            let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            regimen::data::idx::write(
                &d.join(format!("{prefix}-images-idx3-ubyte")),
                &[n, 28, 28],
                &pixels,
            )
            .unwrap();
            regimen::data::idx::write(
                &d.join(format!("{prefix}-labels-idx1-ubyte")),
                &[n],
                &labels,
            )
            .unwrap();
        }
        d
    };
    let (a, moved, b) = (fake("a", 60), fake("moved", 60), fake("b", 61));
    // The same counts, one pixel of one training image changed (pixel 1, after the 16-byte
    // IDX header: every pixel counts, not a sample of them).
    let c = fake("c", 60);
    let images = c.join("train-images-idx3-ubyte");
    let mut bytes = std::fs::read(&images).unwrap();
    bytes[16 + 1] ^= 1;
    std::fs::write(&images, bytes).unwrap();
    let run = dir.join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            "fashion-mnist",
            "--model",
            "flatten,linear:classes",
        ];
        args.extend_from_slice(extra);
        regimen(&args)
    };
    let (code, out, err) = train(&[
        "--epochs",
        "1",
        "--data-dir",
        a.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let resume = |data: &std::path::Path| {
        regimen(&[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--epochs",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
        ])
    };
    // One more image, or one pixel changed: refused, naming both sides.
    for (other, now) in [(&b, 61), (&c, 60)] {
        let (code, _, err) = resume(other);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("is not what the run was trained on")
                && err.contains("the run: 60 training and 20 test images")
                && err.contains(&format!("now: {now} training and 20 test images")),
            "{err}"
        );
    }
    let (code, out, err) = resume(&moved);
    assert_eq!(code, 0, "{out}{err}");
    // `eval` of the run evaluates on the run's own data folder (the 20 test images of
    // `moved`, where the resume took it), not on what the default search finds.
    let (code, out, err) = regimen(&["eval", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("the run's data_dir") && out.contains("test split (20 images)"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--early-stopping --monitor val_loss --restore-best`, one epoch is "the best" for
/// everything: the reported best epoch, `summary.json`, `best.safetensors` (so that `regimen
/// eval` of the run folder gives the final test accuracy) and the restored weights.
#[test]
fn early_stopping_restores_the_epoch_it_reports() {
    let dir = scratch().join(format!("restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "12",
        "--lr",
        "0.3",
        "--early-stopping",
        "2",
        "--monitor",
        "val_loss",
        "--restore-best",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let metrics = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let header: Vec<&str> = metrics.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "val_loss").unwrap();
    let (mut best_epoch, mut best) = (0, f64::INFINITY);
    for (i, line) in metrics.lines().skip(1).enumerate() {
        let v: f64 = line.split(',').nth(col).unwrap().parse().unwrap();
        if v < best {
            (best_epoch, best) = (i + 1, v);
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["best_epoch"], best_epoch, "{out}");
    assert_eq!(summary["best_metric"], "val_loss");
    // The test measured the restored epoch, and the gap is that epoch's training accuracy
    // minus its test accuracy.
    assert_eq!(summary["test_epoch"], best_epoch, "{out}");
    let train_col = header.iter().position(|h| *h == "train_acc").unwrap();
    let train_acc: f64 = metrics
        .lines()
        .nth(best_epoch)
        .unwrap()
        .split(',')
        .nth(train_col)
        .unwrap()
        .parse()
        .unwrap();
    let gap = 100.0 * (train_acc - summary["test_accuracy"].as_f64().unwrap());
    assert!(
        out.contains(&format!("generalization gap {gap:.2} points")),
        "gap {gap:.2}: {out}"
    );
    assert!(
        out.contains(&format!("best epoch {best_epoch} by val_loss"))
            && out.contains(&format!("the model is back at epoch {best_epoch}")),
        "{out}"
    );
    // `eval` of the run folder takes best.safetensors: the restored epoch's test accuracy.
    let (code, eval, err) = regimen(&["eval", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let test = summary["test_accuracy"].as_f64().unwrap();
    assert!(
        eval.contains(&format!("{:.2}%", 100.0 * test)),
        "eval: {eval}\ntrain: {out}"
    );
    // A run that early stopping ended: a resume trains nothing and says why; lengthening it
    // is refused (it would stop again at once).
    assert!(
        out.contains("early stopping:"),
        "this setup stops early: {out}"
    );
    let (code, again, err) = regimen(&["train", "--resume", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(again.contains("early stopping:"), "{again}");
    let after = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(after, metrics, "no further epoch");
    let (code, _, err) = regimen(&["train", "--resume", dir.to_str().unwrap(), "--epochs", "40"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ended by early stopping"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--resume DIR --epochs N` lengthens a run: config.toml then says N, a schedule planned
/// over the run says it is re-planned, and fewer epochs than done are refused.
#[test]
fn resume_lengthens_a_run_and_says_so() {
    let dir = scratch().join(format!("lengthen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let (code, out, err) = regimen(&[
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "2",
        "--schedule",
        "cosine",
        "--out",
        d,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = regimen(&["train", "--resume", d, "--epochs", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("lengthening the run from 2 to 3 epochs; --schedule cosine is planned"),
        "{out}"
    );
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("epochs = 3"), "{config}");
    // Resuming the finished run (nothing to train) adds no TensorBoard file.
    let events = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("tfevents")
            })
            .count()
    };
    let before = events(&dir);
    let (code, _, err) = regimen(&["train", "--resume", d]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(events(&dir), before);
    let (code, out, err) = regimen(&["train", "--resume", d, "--epochs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("not above the 3 epochs the run") && out.contains("final test accuracy"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `regimen` with flags and no command runs `regimen train` with them.
#[test]
fn flags_without_a_command_train() {
    let dir = scratch().join(format!("default-cmd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, err) = regimen(&[
        "--threads",
        "1",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("final test accuracy"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `REGIMEN_DIRECT_ISA=avx2` runs every kernel regimen chooses at run time in its AVX2 version
/// (on an AVX-512 machine: the path of an AVX2-only one, end to end): a CNN trains to the same
/// weights within f32 rounding of the default path's, and `bench` says the kernels were held.
#[test]
fn the_avx2_kernels_train_like_the_default_ones() {
    let dir = scratch().join(format!("avx2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let train = |name: &str, avx2: bool| {
        let path = dir.join(format!("{name}.safetensors"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_regimen"));
        c.args([
            "train",
            "--model",
            "conv:16,bn,relu,conv:16,bn,relu,maxpool:2,dropout:0.1,flatten,linear:classes",
            "--epochs",
            "1",
            "--momentum",
            "0.9",
            "--out",
        ])
        .arg(dir.join(name))
        .arg("--save")
        .arg(&path)
        .current_dir(scratch());
        if avx2 {
            c.env("REGIMEN_DIRECT_ISA", "avx2");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let (t, _) = regimen::io::read_safetensors(&path).unwrap();
        t.into_iter().map(|(_, _, v)| v).collect::<Vec<Vec<f32>>>()
    };
    let (a, b) = (train("default", false), train("avx2", true));
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(&b) {
        let scale = x.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / scale);
        }
    }
    eprintln!("AVX2 vs default kernels: largest relative difference {worst:.2e}");
    assert!(worst < 1e-3, "AVX2 and default kernels differ by {worst}");
    let out = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args([
            "bench",
            "--workload",
            "mlp-step",
            "--batch",
            "8",
            "--steps",
            "1",
            "--reps",
            "1",
            "--json",
        ])
        .env("REGIMEN_DIRECT_ISA", "avx2")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kernels = v["cpu_kernels"].as_str().unwrap();
    assert!(
        !kernels.starts_with("avx512f") || kernels.contains("held to avx2+fma"),
        "{kernels}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C in a terminal (SIGINT to the whole process group) stops a sweep: the running trial
/// writes its checkpoint, the sweep records it as interrupted (not failed), says how to go on
/// and exits 130; the same command then finishes the sweep.
#[test]
fn ctrl_c_stops_a_sweep_that_the_same_command_continues() {
    use std::os::unix::process::CommandExt;
    let dir = scratch().join(format!("sweep-int-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let space = dir.join("space.toml");
    std::fs::write(&space, "lr = \"log_uniform(1e-2, 0.1)\"\n").unwrap();
    let base = dir.join("base.toml");
    std::fs::write(&base, "model = \"digits-mlp\"\nepochs = 60\n").unwrap();
    let out = dir.join("s");
    let args = [
        "sweep",
        "--space",
        space.to_str().unwrap(),
        "--config",
        base.to_str().unwrap(),
        "--trials",
        "2",
        "--eta",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_regimen"))
        .args(args)
        .process_group(0)
        .current_dir(scratch())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first trial has written a checkpoint.
    let first = out.join("trials/trial-000-e60/checkpoints/last.safetensors");
    let start = std::time::Instant::now();
    while !first.is_file() {
        assert!(start.elapsed().as_secs() < 120, "no trial started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = Command::new("kill")
        .args(["-s", "INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(130), "{stdout}");
    assert!(
        stdout.contains("interrupted: the sweep is saved in")
            && stdout.contains("run the same command again to continue it"),
        "{stdout}"
    );
    let state = std::fs::read_to_string(out.join("sweep.json")).unwrap();
    assert!(
        !state.contains("\"status\":\"error") && !state.contains("failed"),
        "{state}"
    );
    // The first trial was stopped in its run (about a second of its 60 epochs was left): it is
    // kept as interrupted, with the seconds it had run.
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let first_run = &state["trials"][0]["runs"][0];
    assert_eq!(first_run["status"], "interrupted", "{state}");
    let interrupted_s = first_run["seconds"].as_f64().unwrap();
    assert!(interrupted_s > 0.0, "{state}");
    let (code, stdout, err) = regimen(&args);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("resuming the sweep"), "{stdout}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    for t in state["trials"].as_array().unwrap() {
        let runs = t["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{t}");
        assert_eq!(runs[0]["status"], "ok", "{t}");
    }
    // The resumed trial's time counts the interrupted attempt too: the attempt's own seconds,
    // as the sweep printed them (one decimal), plus the interrupted one's.
    let line = stdout
        .lines()
        .find(|l| l.contains("trial   0 at 60 epochs: validation accuracy"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let own_s: f64 = line
        .rsplit_once('(')
        .and_then(|(_, x)| x.strip_suffix(" s)"))
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let resumed_s = state["trials"][0]["runs"][0]["seconds"].as_f64().unwrap();
    assert!(
        (resumed_s - (own_s + interrupted_s)).abs() <= 0.051,
        "{resumed_s} s recorded; {own_s} s resumed after {interrupted_s} s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
