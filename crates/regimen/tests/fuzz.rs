//! Fuzzing every parser and loader of untrusted bytes: IDX files (raw and gzip), CIFAR-10
//! batches, checkpoints, optimizer states and run states (safetensors + metadata),
//! preprocessing files, and the spec mini-languages (schedule, augment, preprocess, penalty).
//!
//! Each target mutates valid inputs (bit flips, interesting bytes and integers, insertions,
//! deletions, duplications, truncations; for specs, edits from the specs' own alphabet) and
//! runs the parser. The invariant: an `Err` or an `Ok`, never a panic, an abort, a hang (a
//! watchdog stops the run when one case takes over 30 s), or an allocation larger than
//! [`ALLOC_BOUND`] (a counting allocator watches every allocation of this test binary).
//!
//! The ordinary test run does a fixed budget of cases per target (`REGIMEN_FUZZ_CASES`, default
//! 300). A long run, for example ten minutes per target:
//!
//! ```sh
//! REGIMEN_FUZZ_SECONDS=600 cargo test --release -p regimen --test fuzz -- --nocapture --test-threads 2
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use regimen::data::{self, idx, Pipeline, PreprocessKind, Preprocessor};
use regimen::layer::Layer;
use regimen::loss::parse_penalty;
use regimen::optim::{Adam, Optim, OptimConfig};
use regimen::schedule::{parse_schedule, Constant};
use regimen::{models, Rng, RunState};

/// No single allocation may exceed this (the inputs are at most a few hundred kilobytes).
const ALLOC_BOUND: usize = 64 << 20;

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOC_BOUND {
            // Refuse instead of paging in gigabytes; the check below names the target.
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        if new_size > ALLOC_BOUND {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Cases run by each target: a count, or a duration.
fn budget() -> (usize, Option<Duration>) {
    let secs = std::env::var("REGIMEN_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let cases = std::env::var("REGIMEN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    match secs {
        Some(s) => (usize::MAX, Some(Duration::from_secs(s))),
        None => (cases, None),
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("regimen-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One mutation of `v`.
fn mutate(v: &mut Vec<u8>, r: &mut Rng) {
    const INTERESTING: [u32; 10] = [
        0,
        1,
        2,
        255,
        65535,
        10_000_000,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF_FFFF,
        4096,
    ];
    let n = v.len();
    match r.below(8) {
        0 if n > 0 => {
            let i = r.below(n);
            v[i] ^= 1 << r.below(8);
        }
        1 if n > 0 => {
            let i = r.below(n);
            v[i] = [0u8, 0xFF, 0x7F, 0x80, 1, b'{', b'"', b'9'][r.below(8)];
        }
        2 if n >= 4 => {
            let i = r.below(n - 3);
            let x = INTERESTING[r.below(INTERESTING.len())];
            let bytes = if r.below(2) == 0 {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            };
            v[i..i + 4].copy_from_slice(&bytes);
        }
        3 => {
            let i = r.below(n + 1);
            let k = 1 + r.below(16);
            for _ in 0..k {
                v.insert(i, r.below(256) as u8);
            }
        }
        4 if n > 0 => {
            let i = r.below(n);
            let k = 1 + r.below((n - i).min(64));
            v.drain(i..i + k);
        }
        5 if n > 0 => {
            let i = r.below(n);
            let k = 1 + r.below((n - i).min(64));
            let piece = v[i..i + k].to_vec();
            let j = r.below(n + 1);
            v.splice(j..j, piece);
        }
        6 if n > 0 => v.truncate(r.below(n)),
        _ if n > 0 => {
            // Overwrite a run with one byte value.
            let i = r.below(n);
            let k = 1 + r.below((n - i).min(32));
            let b = r.below(256) as u8;
            v[i..i + k].iter_mut().for_each(|x| *x = b);
        }
        _ => v.push(r.below(256) as u8),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Run `target` on mutations of `seeds` within the budget; any panic or oversize allocation
/// fails with the input that caused it. Returns the number of cases.
fn fuzz(name: &str, seeds: &[Vec<u8>], mut target: impl FnMut(&[u8])) -> usize {
    let (cases, duration) = budget();
    let start = Instant::now();
    let progress = std::sync::Arc::new(AtomicU64::new(0));
    let watch = progress.clone();
    let tag = name.to_string();
    // The watchdog: a case that runs 30 s is a hang.
    std::thread::spawn(move || {
        let mut last = u64::MAX;
        loop {
            std::thread::sleep(Duration::from_secs(30));
            let now = watch.load(Ordering::Relaxed);
            if now == u64::MAX {
                return;
            }
            if now == last {
                eprintln!("fuzz {tag}: a case has run for 30 s (a hang)");
                std::process::abort();
            }
            last = now;
        }
    });
    let mut r = Rng::new(0xF022 ^ name.len() as u64 ^ name.bytes().map(u64::from).sum::<u64>());
    let mut done = 0;
    while done < cases && duration.is_none_or(|d| start.elapsed() < d) {
        let mut input = seeds[r.below(seeds.len())].clone();
        for _ in 0..1 + r.below(4) {
            mutate(&mut input, &mut r);
        }
        LARGEST.store(0, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            outcome.is_ok(),
            "fuzz {name}: a panic on input ({} bytes) {:02x?}",
            input.len(),
            &input[..input.len().min(256)]
        );
        assert!(
            largest <= ALLOC_BOUND,
            "fuzz {name}: an allocation of {largest} bytes on input {:02x?}",
            &input[..input.len().min(256)]
        );
        done += 1;
        progress.store(done as u64, Ordering::Relaxed);
    }
    progress.store(u64::MAX, Ordering::Relaxed);
    eprintln!(
        "fuzz {name}: {done} cases in {:.1} s, no finding",
        start.elapsed().as_secs_f64()
    );
    done
}

/// A small valid IDX images file and labels file.
fn idx_seeds() -> (Vec<u8>, Vec<u8>) {
    let dir = tmpdir("idxseed");
    let images = dir.join("i");
    idx::write(&images, &[4, 3, 2], &(0..24).collect::<Vec<u8>>()).unwrap();
    let labels = dir.join("l");
    idx::write(&labels, &[4], &[0, 1, 2, 9]).unwrap();
    (
        std::fs::read(images).unwrap(),
        std::fs::read(labels).unwrap(),
    )
}

fn on_file(dir: &Path, bytes: &[u8], f: impl FnOnce(&Path)) {
    let p = dir.join("case");
    std::fs::write(&p, bytes).unwrap();
    f(&p);
}

#[test]
fn fuzz_idx() {
    let dir = tmpdir("idx");
    let (images, labels) = idx_seeds();
    let seeds = vec![images.clone(), labels.clone(), gzip(&images), gzip(&labels)];
    fuzz("idx", &seeds, |b| {
        on_file(&dir, b, |p| {
            let _ = idx::read_images(p);
            let _ = idx::read_labels(p);
        })
    });
}

#[test]
fn fuzz_dataset_directory() {
    // The four files together, through the loader that checks them against each other.
    let dir = tmpdir("fmnist");
    let (images, labels) = idx_seeds();
    for split in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), &images).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), &labels).unwrap();
    }
    let seeds = vec![images, labels];
    let mut which = 0usize;
    fuzz("fashion-mnist files", &seeds, |b| {
        which = (which + 1) % 4;
        let name = [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ][which];
        let path = dir.join(name);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, b).unwrap();
        let _ = data::load("fashion-mnist", Some(&dir));
        std::fs::write(&path, good).unwrap();
    });
}

#[test]
fn fuzz_cifar() {
    let dir = tmpdir("cifar");
    let mut batch = Vec::new();
    for i in 0..3u8 {
        batch.push(i);
        batch.extend((0..3072).map(|j| (j % 251) as u8));
    }
    fuzz("cifar", &[batch], |b| {
        on_file(&dir, b, |p| drop(data::read_cifar_batch(p)))
    });
}

/// Checkpoints, optimizer states, run states and preprocessing files: safetensors with
/// regimen's metadata.
#[test]
fn fuzz_safetensors_files() {
    let dir = tmpdir("st");
    let mut rng = Rng::new(1);
    let mut model = models::mlp(4, &[3], 2, regimen::Unary::Relu, 0.0, &mut rng).unwrap();
    let data = regimen::data::Dataset {
        images: (0..40).map(|i| (i % 7) as f32 / 7.0).collect(),
        labels: vec![0, 1, 0, 1, 1, 0, 1, 0, 0, 1],
        image_shape: [1, 2, 2],
        class_names: vec!["a".into(), "b".into()],
    };
    let pre = Preprocessor::fit(PreprocessKind::parse("pca:2").unwrap(), &data).unwrap();
    let ck = dir.join("ck");
    regimen::checkpoint::save(&ck, &mut model, Some(&pre), Default::default()).unwrap();
    let mut opt = Optim::new(Adam::default(), OptimConfig::default()).unwrap();
    let x = regimen::Tensor::from_vec(&[2, 4], vec![0.1; 8]).unwrap();
    let y = model.forward(&x, &regimen::Ctx::train()).unwrap();
    model.backward(&y).unwrap();
    opt.step(&mut model, 0.01).unwrap();
    let op = dir.join("opt");
    opt.save(&op).unwrap();
    let rs = dir.join("rs");
    RunState::capture(&mut model, &opt, &Constant(0.1), 3, 1)
        .save(&rs)
        .unwrap();
    let pp = dir.join("pre");
    pre.save(&pp).unwrap();
    let mut seeds: Vec<Vec<u8>> = [&ck, &op, &rs, &pp]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    // The same files without their checksum (as another tool writes them): a changed tensor
    // byte then gets past the checksum to the checks behind it (NaN weights, variances,
    // shapes against the metadata), which the fuzzer should reach too.
    for p in [&ck, &op, &rs, &pp] {
        let (tensors, meta) = regimen::io::read_safetensors(p).unwrap();
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|f| f.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        let meta: std::collections::HashMap<String, String> = meta.into_iter().collect();
        seeds.push(safetensors::serialize(views, Some(meta)).unwrap());
    }
    fuzz("safetensors files", &seeds, |b| {
        on_file(&dir, b, |p| {
            let mut m =
                models::mlp(4, &[3], 2, regimen::Unary::Relu, 0.0, &mut Rng::new(1)).unwrap();
            let _ = regimen::checkpoint::load(p, &mut m);
            let mut o = Optim::new(Adam::default(), OptimConfig::default()).unwrap();
            let _ = o.load(p);
            if let Ok(state) = RunState::load(p) {
                let _ = state.restore(&mut m, &mut o, &mut Constant(0.1), "fuzz");
            }
            if let Ok(pre) = Preprocessor::load(p) {
                let mut d = data.clone();
                let _ = pre.apply(&mut d);
            }
        })
    });
}

/// The spec mini-languages: edits of valid specs drawn from their own alphabet.
#[test]
fn fuzz_specs() {
    let seeds: Vec<Vec<u8>> = [
        "cosine:min=0.001",
        "onecycle:pct=0.2,div=25,final_div=1e4,anneal=cos,three_phase=true",
        "cyclic:min=0.01,max=0.1,up=5,down=5,mode=exp_range,gamma=0.99",
        "multistep:milestones=3/6/9,gamma=0.5",
        "restarts:t0=5,mult=2,min=0.001",
        "plateau:factor=0.5,patience=2,threshold=1e-4,cooldown=1,min_lr=1e-5",
        "crop=2,flip=0.5,scale=0.3,rotate=15,translate=2,noise=0.1,cutout=4,mixup=0.2,cutmix=1.0",
        "pca:3",
        "whiten:2",
        "elastic:1e-4:0.5",
        "l2:0.01",
        "conv:8:5:2:2:nobias,bn,prelu,fmp,conv:4,avgpool:2:1,flatten,maxout:6:3,linear:classes",
        "resnet:1:4:0.2,init=he,activation=gelu",
        "deep-mlp:3:20,activation=tanh,init=xavier",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("specs", &seeds, |b| {
        let s = String::from_utf8_lossy(b);
        let _ = parse_schedule(&s, 0.1, 100, 5, None);
        let _ = parse_schedule(&s, 0.1, 100, 0, Some(0.1));
        if let Ok(p) = Pipeline::parse(&s) {
            let mut img = vec![0.5f32; 2 * 16];
            let _ = p
                .check_image_shape([1, 4, 4])
                .map(|_| p.apply(&mut img, [1, 4, 4], &[0, 1], 2, &mut Rng::new(0)));
        }
        let _ = PreprocessKind::parse(&s);
        let _ = parse_penalty(&s);
        // Model specs are planned, never built: a spec's sizes are checked before allocation.
        if let Ok(m) = regimen::models::ModelSpec::parse(&s) {
            let _ = m.plan([3, 8, 8], 4);
        }
    });
}
