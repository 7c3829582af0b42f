//! Crash safety: a process killed (SIGKILL) in the middle of writing a checkpoint leaves the
//! target either the old file or the new one, complete, never a mix or a truncation.
//!
//! The test starts this same test binary as a child that writes two different checkpoints to
//! one path, alternately, as fast as it can; the parent kills it at random moments, 40 times,
//! and each time loads the target and checks it is exactly one of the two.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use regimen::{models, Rng};

const CHILD: &str = "REGIMEN_CRASH_CHILD";

fn model(seed: u64) -> regimen::layers::Sequential {
    // Big enough that a write takes a while (about 1 MB).
    models::mlp(
        64,
        &[2048],
        10,
        regimen::Unary::Relu,
        0.0,
        &mut Rng::new(seed),
    )
    .unwrap()
}

fn weights(path: &std::path::Path) -> regimen::Result<Vec<f32>> {
    let (tensors, _) = regimen::io::read_safetensors(path)?;
    Ok(tensors.into_iter().flat_map(|t| t.2).collect())
}

/// The child's loop (only when started by the parent below).
#[test]
fn child_writer() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let path = PathBuf::from(path);
    let (mut a, mut b) = (model(1), model(2));
    loop {
        regimen::checkpoint::save(&path, &mut a, None, Default::default()).unwrap();
        regimen::checkpoint::save(&path, &mut b, None, Default::default()).unwrap();
    }
}

#[test]
fn a_killed_write_leaves_the_old_or_the_new_file() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("regimen-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut a, mut b) = (model(1), model(2));
    let pa = dir.join("a.safetensors");
    let pb = dir.join("b.safetensors");
    regimen::checkpoint::save(&pa, &mut a, None, Default::default()).unwrap();
    regimen::checkpoint::save(&pb, &mut b, None, Default::default()).unwrap();
    let (wa, wb) = (weights(&pa).unwrap(), weights(&pb).unwrap());
    // Two names: an ordinary one, and one ending in .tmp (where a temporary file named after
    // the target would be the target itself).
    let targets = [dir.join("run.safetensors"), dir.join("m.tmp")];
    for t in &targets {
        std::fs::copy(&pa, t).unwrap();
    }
    let mut rng = Rng::new(9);
    let (mut saw_a, mut saw_b) = (0, 0);
    for round in 0..40 {
        let path = &targets[round % 2];
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_writer",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD, path)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng.below(150) as u64));
        child.kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().unwrap();
        let w = weights(path)
            .unwrap_or_else(|e| panic!("round {round}: the target does not load: {e}"));
        if w == wa {
            saw_a += 1;
        } else if w == wb {
            saw_b += 1;
        } else {
            panic!("round {round}: the target is neither the old nor the new checkpoint");
        }
    }
    eprintln!("40 kills: the target was the first checkpoint {saw_a} times, the second {saw_b}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A save never touches another file of the user's: not `notes.tmp` beside
/// `notes.safetensors`, nor the temporary of a save to another name in the same folder.
#[test]
fn saving_leaves_other_files_alone() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("regimen-neighbours-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.tmp");
    std::fs::write(&notes, b"my notes").unwrap();
    let mut m = model(3);
    regimen::checkpoint::save(
        &dir.join("notes.safetensors"),
        &mut m,
        None,
        Default::default(),
    )
    .unwrap();
    regimen::checkpoint::save(&dir.join("notes.bin"), &mut m, None, Default::default()).unwrap();
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "no temporary file left behind: {names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
