//! Data-parallel training under `mpirun -np 2` (the `distributed` feature; needs Open MPI's
//! `mpirun` on the PATH, as `.ci/run` installs it). Each test starts real ranks of the real
//! binary on the embedded digits.
#![cfg(feature = "distributed")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_regimen");

/// `mpirun` for local ranks: oversubscribed (two cores), as root where CI runs as root, shared
/// memory between the ranks.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"]);
    if is_root() {
        c.arg("--allow-run-as-root");
    }
    c.env("OMPI_MCA_btl", "self,vader")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .current_dir(scratch());
    c
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("regimen-dist-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(mut c: Command) -> (i32, String, String) {
    let out: Output = c.output().expect("mpirun runs (install openmpi-bin)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `regimen train` on the digits with `args`, on `np` ranks (1: a plain process).
fn train(np: usize, args: &[&str]) -> (i32, String, String) {
    let mut c = if np == 1 {
        let mut c = Command::new(BIN);
        c.current_dir(scratch());
        c
    } else {
        let mut c = mpirun(np);
        c.arg(BIN);
        c
    };
    c.arg("train").args(args);
    run(c)
}

/// The float tensors of a safetensors file, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = regimen::io::read_safetensors(path).unwrap();
    t.into_iter().map(|(n, _, v)| (n, v)).collect()
}

/// The largest difference between two models' tensors, relative to the largest value.
fn max_rel_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let scale = va.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

fn fresh(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 2 ranks of batch B and one process of batch 2B take the same steps: after 3 epochs (123
/// steps of SGD with momentum) their weights agree to f32 rounding. A rank that summed its
/// gradients instead of averaging them (or took a wrong share of the last, partial batch)
/// would train at another rate and differ by orders of magnitude more.
#[test]
fn two_ranks_equal_one_process_with_twice_the_batch() {
    let d = fresh("equiv");
    let common = [
        "--model",
        "digits-mlp",
        "--epochs",
        "3",
        "--momentum",
        "0.9",
        "--lr",
        "0.05",
        "--seed",
        "3",
    ];
    let run_with = |np: usize, batch: &str, name: &str| {
        let mut a: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--batch-size",
                batch,
                "--out",
                &path(&d, name),
                "--save",
                &path(&d, &format!("{name}.safetensors")),
            ]
            .map(String::from),
        );
        let (code, out, err) = train(np, &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let two = run_with(2, "16", "two");
    run_with(1, "32", "one");
    run_with(1, "16", "half");
    // 1294 training digits: 40 full global batches of 32 and one of 14, split 7 + 7.
    assert!(two.contains("global batch 32 (16 per rank)"), "{two}");
    let same = max_rel_diff(&d.join("two.safetensors"), &d.join("one.safetensors"));
    let other = max_rel_diff(&d.join("half.safetensors"), &d.join("one.safetensors"));
    eprintln!("2x16 vs 1x32: {same:.2e}; 1x16 vs 1x32: {other:.2e}");
    assert!(same < 2e-4, "2 ranks x 16 vs 1 x 32: {same}");
    assert!(
        other > 100.0 * same,
        "a run with half the batch differs only {other}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// With `--sync-bn`, batch norm's statistics are the global batch's: 2 ranks x 16 equal one
/// process x 32 again (a model with batch norm); without it, each rank normalizes by its own
/// 16 samples and the runs part.
#[test]
fn sync_bn_makes_two_ranks_equal_one_process() {
    let d = fresh("syncbn");
    let model = "conv:8,bn,relu,maxpool:2,flatten,linear:classes";
    let run_with = |np: usize, batch: &str, name: &str, extra: &[&str]| {
        let mut a = vec![
            "--model".to_string(),
            model.into(),
            "--epochs".into(),
            "2".into(),
            "--momentum".into(),
            "0.9".into(),
            "--lr".into(),
            "0.05".into(),
            "--batch-size".into(),
            batch.into(),
            "--out".into(),
            path(&d, name),
            "--save".into(),
            path(&d, &format!("{name}.safetensors")),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let (code, out, err) = train(np, &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let synced = run_with(2, "16", "synced", &["--sync-bn"]);
    assert!(synced.contains("batch norm synchronized"), "{synced}");
    run_with(2, "16", "local", &[]);
    run_with(1, "32", "one", &[]);
    let with = max_rel_diff(&d.join("synced.safetensors"), &d.join("one.safetensors"));
    let without = max_rel_diff(&d.join("local.safetensors"), &d.join("one.safetensors"));
    eprintln!("sync-bn vs one process: {with:.2e}; per-rank bn: {without:.2e}");
    assert!(with < 2e-4, "--sync-bn: {with}");
    assert!(
        without > 100.0 * with,
        "per-rank statistics differ only {without}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The same seed on the same number of ranks gives the same weights, bit for bit; rank 0 alone
/// prints and writes the run folder.
#[test]
fn same_seed_same_ranks_same_bits_and_rank_zero_alone_writes() {
    let d = fresh("bits");
    let args = |name: &str| -> Vec<String> {
        [
            "--model",
            "conv:8,bn,relu,dropout:0.2,maxpool:2,flatten,linear:classes",
            "--epochs",
            "2",
            "--augment",
            "crop=1,flip,mixup=0.2",
            "--batch-size",
            "16",
            "--save",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([path(&d, &format!("{name}.safetensors"))])
        .collect()
    };
    // No --out: rank 0 names the run folder under runs/ and tells the other rank.
    let a = args("a");
    let mut c = mpirun(2);
    c.current_dir(&d).arg(BIN).arg("train").args(&a);
    let (code, out, err) = run(c);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("final test accuracy").count(), 1, "{out}");
    assert_eq!(out.matches("\n    2 ").count(), 1, "one epoch table: {out}");
    let runs: Vec<_> = std::fs::read_dir(d.join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 1, "one run folder");
    let b = args("b");
    let (code, out, err) = train(2, &b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    let bits = |p: &Path| -> Vec<(String, Vec<u32>)> {
        tensors(p)
            .into_iter()
            .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    };
    assert_eq!(
        bits(&d.join("a.safetensors")),
        bits(&d.join("b.safetensors"))
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A run on 2 ranks stopped in the middle of an epoch resumes on 2 ranks to exactly the
/// uninterrupted run, and on 1 process (and a 1-process run on 2 ranks) to the end.
#[test]
fn resume_on_the_same_and_other_numbers_of_ranks() {
    let d = fresh("resume");
    let args = |name: &str| -> Vec<String> {
        [
            "--model",
            "digits-mlp",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--schedule",
            "cosine",
            "--momentum",
            "0.9",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([path(&d, name)])
        .collect()
    };
    let strs = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(" ");
    let a = args("full");
    let (code, out, err) = train(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    // Interrupted at update 50 on 2 ranks, resumed on 2. The ranks agree to stop with the
    // next step's gradient sums: after update 51, epoch 2's batch 9 (of 41).
    let a = args("part");
    let mut c = mpirun(2);
    c.env("REGIMEN_INTERRUPT_AT_STEP", "50")
        .arg("-x")
        .arg("REGIMEN_INTERRUPT_AT_STEP")
        .arg(BIN)
        .arg("train")
        .args(&a);
    let (code, out, err) = run(c);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains("interrupted in epoch 2 before batch 10"),
        "{}: {out}{err}",
        strs(&a)
    );
    let resume = |np: usize, name: &str| {
        let (code, out, err) = train(np, &["--resume", &path(&d, name)]);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let out = resume(2, "part");
    assert!(out.contains("at batch 10 of epoch 2"), "{out}");
    let last = "checkpoints/last.safetensors";
    assert_eq!(
        max_rel_diff(&d.join("full").join(last), &d.join("part").join(last)),
        0.0
    );
    // 2 ranks -> 1 process: batch 10 of 32 samples is batch 20 of 16.
    let a = args("to-one");
    let mut c = mpirun(2);
    c.env("REGIMEN_INTERRUPT_AT_STEP", "50")
        .arg("-x")
        .arg("REGIMEN_INTERRUPT_AT_STEP")
        .arg(BIN)
        .arg("train")
        .args(&a);
    let (code, _, _) = run(c);
    assert_ne!(code, 0);
    let out = resume(1, "to-one");
    assert!(out.contains("at batch 20 of epoch 2"), "{out}");
    assert!(out.contains("final test accuracy"), "{out}");
    // 1 process -> 2 ranks: interrupted after update 30 of batch 16 (epoch 1, batch 30).
    let a = args("to-two");
    let mut c = Command::new(BIN);
    c.current_dir(scratch())
        .env("REGIMEN_INTERRUPT_AT_STEP", "30")
        .arg("train")
        .args(&a);
    let (code, _, _) = run(c);
    assert_eq!(code, 130);
    let out = resume(2, "to-two");
    assert!(out.contains("at batch 15 of epoch 1"), "{out}");
    assert!(out.contains("final test accuracy"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

/// An interrupt that reaches one rank in time for an epoch's last exchange of stop flags stops
/// every rank at that epoch's end, all of them as interrupted: before, that rank ended as
/// interrupted (its own flag) while the others, whose flags were down, ended as completed, went
/// on to the final test and waited there for it until the timeout.
#[test]
fn an_interrupt_on_one_rank_at_an_epoch_s_end_stops_them_all() {
    let d = fresh("interrupt-one");
    let out = path(&d, "run");
    let mut c = mpirun(2);
    // 1294 images in global batches of 32: 41 updates per epoch. Raised after update 40, the
    // flag rides update 41's exchange, the last of epoch 1.
    c.env("REGIMEN_INTERRUPT_AT_STEP", "40")
        .env("REGIMEN_INTERRUPT_RANK", "1")
        .env("REGIMEN_DIST_TIMEOUT", "30")
        .args(["-x", "REGIMEN_INTERRUPT_AT_STEP"])
        .args(["-x", "REGIMEN_INTERRUPT_RANK"])
        .args(["-x", "REGIMEN_DIST_TIMEOUT"])
        .arg(BIN)
        .arg("train")
        .args([
            "--model",
            "digits-mlp",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--out",
            &out,
        ]);
    let start = std::time::Instant::now();
    let (code, stdout, err) = run(c);
    assert_ne!(code, 0, "{stdout}{err}");
    assert!(
        stdout.contains("interrupted in epoch 2 before batch 0"),
        "{stdout}{err}"
    );
    assert!(!err.contains("no answer"), "{err}");
    assert!(start.elapsed().as_secs() < 25, "{:?}", start.elapsed());
    let (code, stdout, err) = train(2, &["--resume", &out]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("final test accuracy"), "{stdout}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A run that diverges on 2 ranks: rank 0 writes what it writes (here the --save of the last
/// finite model) before the other ranks end the job.
#[test]
fn a_divergence_on_several_ranks_lets_rank_zero_save() {
    let d = fresh("diverge");
    let save = path(&d, "model.safetensors");
    let (code, stdout, err) = train(
        2,
        &[
            "--model",
            "digits-mlp",
            "--epochs",
            "2",
            "--lr",
            "1e30",
            "--save",
            &save,
            "--out",
            &path(&d, "run"),
        ],
    );
    assert_ne!(code, 0, "{stdout}{err}");
    assert!(err.contains("training diverged"), "{err}");
    assert!(
        stdout.contains("saved the model (its last finite state)"),
        "{stdout}{err}"
    );
    assert!(std::path::Path::new(&save).is_file());
    let _ = std::fs::remove_dir_all(&d);
}

/// Ranks started with different configs stop at once with a message naming the rank.
#[test]
fn different_configs_on_the_ranks_are_refused() {
    let mut c = mpirun(1);
    c.args([
        BIN,
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--seed",
        "0",
    ])
    .args([":", "-np", "1"])
    .args([
        BIN,
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "1",
        "--seed",
        "1",
    ]);
    let (code, out, err) = run(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("the resolved config of rank 1 differs from rank 0's"),
        "{out}{err}"
    );
}

/// A rank that fails (here rank 1 refuses its flags) ends the job: the other rank, waiting for
/// it at the start, is stopped by the launcher, and the message names the failing rank.
#[test]
fn a_rank_that_fails_ends_the_job() {
    let t = Instant::now();
    let mut c = mpirun(1);
    c.args([BIN, "train", "--model", "digits-mlp", "--epochs", "1"])
        .args([":", "-np", "1"])
        .args([BIN, "train", "--model", "digits-mlp", "--epochs", "0"]);
    let (code, out, err) = run(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("error: rank 1 of 2: invalid --epochs 0"),
        "{out}{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));
}

/// Start a long 2-rank run in `d/run` with `env`, wait for its first checkpoint, send
/// `signal` to rank 1, and wait (at most 60 s) for the job to end. Returns its exit code,
/// stderr, and rank 1's process id.
fn signal_rank_one(d: &Path, env: &[(&str, &str)], signal: &str) -> (Option<i32>, String, u32) {
    let mut c = mpirun(2);
    for (k, v) in env {
        c.env(k, v).args(["-x", k]);
    }
    c.args([
        BIN,
        "train",
        "--model",
        "digits-mlp",
        "--epochs",
        "100000",
        "--batch-size",
        "8",
        "--out",
        &path(d, "run"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let last = d.join("run/checkpoints/last.safetensors");
    let t = Instant::now();
    while !last.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rank 1: the child of mpirun whose environment says so.
    let victim = rank_pid(child.id(), 1).expect("rank 1's process");
    assert!(Command::new("kill")
        .args(["-s", signal, &victim.to_string()])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after rank 1 got SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
        victim,
    )
}

/// A rank that stops answering (stopped with SIGSTOP) makes the other rank give up after
/// REGIMEN_DIST_TIMEOUT seconds with a message, and the job ends instead of hanging.
#[test]
fn a_rank_that_hangs_ends_the_job_after_the_timeout() {
    let d = fresh("hang");
    // Long enough that a rank slowed by the other tests on a 2-core machine still answers.
    let (code, err, victim) = signal_rank_one(&d, &[("REGIMEN_DIST_TIMEOUT", "10")], "STOP");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("error: rank 0 of 2: no answer from the other ranks for 10 s"),
        "stderr: {err}"
    );
    let _ = Command::new("kill")
        .args(["-s", "KILL", &victim.to_string()])
        .status();
    let _ = std::fs::remove_dir_all(&d);
}

/// Several ranks on GPUs: each rank takes GPU `local rank mod GPUs`; where no GPU can be used
/// (these machines), every rank says why in one line before any work, and the job ends.
#[test]
fn gpus_on_several_ranks_without_a_gpu_end_in_one_line() {
    let mut c = mpirun(2);
    c.args([BIN, "train", "--model", "digits-mlp", "--device", "cuda"]);
    let (code, _, err) = run(c);
    assert_ne!(code, 0);
    assert!(err.contains("no CUDA driver found"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let mut c = mpirun(2);
    c.args([
        BIN,
        "train",
        "--model",
        "digits-mlp",
        "--device",
        "cuda",
        "--graph",
    ]);
    let (code, _, err) = run(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("no CUDA driver found") || err.contains("--graph"),
        "{err}"
    );
}

/// A rank killed in the middle of a run ends the whole job within seconds, and the launcher
/// names the rank; the last checkpoint (rank 0's) is whole.
#[test]
fn a_killed_rank_ends_the_job() {
    let d = fresh("kill");
    let (code, err, _) = signal_rank_one(&d, &[], "KILL");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "stderr: {err}"
    );
    // The last checkpoint (rank 0's) is whole: it evaluates.
    let mut c = Command::new(BIN);
    c.current_dir(scratch())
        .args(["eval", &path(&d, "run/checkpoints/last.safetensors")]);
    let (code, out, err) = run(c);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("accuracy"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The process id of rank `rank` among the descendants of `parent` (from their environments).
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut stack = vec![parent];
    while let Some(p) = stack.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{c}/environ")).unwrap_or_default();
            if env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()) {
                return Some(c);
            }
            stack.push(c);
        }
    }
    None
}

/// `REGIMEN_NCCL=1` sums GPU ranks' gradients with NCCL; ranks on the CPU say that MPI sums
/// theirs, once, and train exactly as without it (the same bits).
#[test]
fn nccl_asked_on_cpu_ranks_falls_back_to_mpi_and_says_so() {
    let d = fresh("nccl-cpu");
    let run_with = |nccl: bool, name: &str| {
        let mut c = mpirun(2);
        if nccl {
            c.args(["-x", "REGIMEN_NCCL=1"]);
        }
        c.args([
            BIN,
            "train",
            "--model",
            "digits-mlp",
            "--epochs",
            "1",
            "--seed",
            "5",
            "--out",
            &path(&d, name),
            "--save",
            &path(&d, &format!("{name}.safetensors")),
        ]);
        let (code, out, err) = run(c);
        assert_eq!(code, 0, "{out}{err}");
        err
    };
    let err = run_with(true, "nccl");
    assert_eq!(
        err.matches("REGIMEN_NCCL=1: the model is on the CPU")
            .count(),
        1,
        "{err}"
    );
    let plain = run_with(false, "plain");
    assert!(!plain.contains("REGIMEN_NCCL"), "{plain}");
    assert_eq!(
        tensors(&d.join("nccl.safetensors")),
        tensors(&d.join("plain.safetensors"))
    );
    let _ = std::fs::remove_dir_all(&d);
}
