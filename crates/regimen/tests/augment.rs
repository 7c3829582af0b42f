//! Augmentation properties and the loader's reproducibility.

use std::sync::Arc;

use regimen::data::augment::{cutmix_box, cutout, flip_horizontal, paste_box, rotate, shift};
use regimen::data::{Augment, Dataset, Loader, Pipeline};
use regimen::Rng;

fn image(shape: [usize; 3], seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| 0.1 + r.next_f64() as f32)
        .collect() // never 0
}

#[test]
fn flip_twice_is_the_identity_and_once_mirrors() {
    let shape = [3, 5, 7];
    let x = image(shape, 1);
    let mut y = x.clone();
    flip_horizontal(&mut y, shape);
    // Channel 2, row 1: the first pixel is the old last one.
    assert_eq!(y[2 * 35 + 7], x[2 * 35 + 7 + 6]);
    flip_horizontal(&mut y, shape);
    assert_eq!(x, y);
}

#[test]
fn crop_with_padding_keeps_the_right_pixels() {
    let shape = [2, 6, 6];
    let x = image(shape, 2);
    for (dy, dx) in [(0, 0), (2, -1), (-3, 3), (4, 4), (-6, 0)] {
        let mut y = x.clone();
        shift(&mut y, shape, dy, dx);
        for c in 0..2 {
            for r in 0..6isize {
                for col in 0..6isize {
                    let (sy, sx) = (r + dy, col + dx);
                    let want = if (0..6).contains(&sy) && (0..6).contains(&sx) {
                        x[c * 36 + (sy * 6 + sx) as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(
                        y[c * 36 + (r * 6 + col) as usize],
                        want,
                        "shift ({dy}, {dx}) at {c},{r},{col}"
                    );
                }
            }
        }
    }
}

#[test]
fn cutout_zeroes_exactly_the_clipped_box() {
    let shape = [3, 8, 8];
    let x = image(shape, 3);
    for (cy, cx, size) in [(4, 4, 4), (0, 0, 4), (7, 6, 5), (3, 3, 20)] {
        let mut y = x.clone();
        let (y0, y1, x0, x1) = cutout(&mut y, shape, cy, cx, size);
        for c in 0..3 {
            for r in 0..8 {
                for col in 0..8 {
                    let inside = (y0..y1).contains(&r) && (x0..x1).contains(&col);
                    let i = c * 64 + r * 8 + col;
                    assert_eq!(
                        y[i],
                        if inside { 0.0 } else { x[i] },
                        "box ({cy},{cx},{size}) at {c},{r},{col}"
                    );
                }
            }
        }
        assert_eq!((y1 - y0).min(size), y1 - y0);
    }
}

#[test]
fn rotation_by_zero_is_identity_and_by_180_reverses() {
    let shape = [1, 5, 5];
    let x = image(shape, 4);
    let mut y = x.clone();
    rotate(&mut y, shape, 0.0);
    y.iter()
        .zip(&x)
        .for_each(|(a, b)| assert!((a - b).abs() < 1e-6));
    rotate(&mut y, shape, std::f64::consts::PI);
    let mut rev = x.clone();
    rev.reverse();
    y.iter()
        .zip(&rev)
        .for_each(|(a, b)| assert!((a - b).abs() < 1e-5));
}

fn batch(n: usize, shape: [usize; 3]) -> (Vec<f32>, Vec<u32>) {
    // Image i is filled with the value i + 1 and has label i, so each pixel tells where it
    // came from and each label weight which image it stands for.
    let d: usize = shape.iter().product();
    (
        (0..n)
            .flat_map(|i| std::iter::repeat_n((i + 1) as f32, d))
            .collect(),
        (0..n as u32).collect(),
    )
}

#[test]
fn mixup_and_cutmix_label_weights_sum_to_one_and_match_pixel_proportions() {
    let shape = [2, 8, 8];
    let d = 128;
    for spec in ["mixup=0.4", "cutmix=1.0", "mixup=1.0,cutmix=0.5"] {
        let p = Pipeline::parse(spec).unwrap();
        let mut mixed = 0;
        for seed in 0..20 {
            let (mut x, labels) = batch(6, shape);
            let soft = p
                .apply(&mut x, shape, &labels, 6, &mut Rng::new(seed))
                .unwrap();
            for i in 0..6 {
                let row = &soft[i * 6..(i + 1) * 6];
                assert!(
                    (row.iter().sum::<f32>() - 1.0).abs() < 1e-6,
                    "{spec}: labels sum to one"
                );
                // The mean pixel is the label-weighted mean of the source values: the label
                // weights are exactly the proportions of each source image in the pixels.
                let mean_pixel = x[i * d..(i + 1) * d].iter().sum::<f32>() / d as f32;
                let by_labels: f32 = row
                    .iter()
                    .enumerate()
                    .map(|(c, w)| w * (c + 1) as f32)
                    .sum();
                assert!(
                    (mean_pixel - by_labels).abs() < 1e-4,
                    "{spec} seed {seed} image {i}: pixels {mean_pixel} vs labels {by_labels}"
                );
                mixed += usize::from(row[i] < 0.999);
            }
        }
        assert!(
            mixed > 30,
            "{spec}: most samples are actually mixed ({mixed} of 120)"
        );
    }
}

#[test]
fn cutmix_box_follows_the_formulas() {
    let mut rng = Rng::new(9);
    for lam in [0.0f32, 0.3, 0.75, 1.0] {
        for _ in 0..50 {
            let b = cutmix_box(32, 32, lam, &mut rng);
            assert!(b.y0 <= b.y1 && b.y1 <= 32 && b.x0 <= b.x1 && b.x1 <= 32);
            // Unclipped size is 32 sqrt(1 - l) per side; clipping only shrinks it.
            let side = 32.0 * (1.0 - lam).sqrt();
            assert!(
                (b.y1 - b.y0) as f32 <= side.round() + 1.0
                    && (b.x1 - b.x0) as f32 <= side.round() + 1.0
            );
            let w = b.weight(32, 32);
            assert!(
                (0.0..=1.0).contains(&w) && w >= lam - 0.07,
                "l {lam} -> weight {w}"
            );
        }
    }
    // Pasting copies exactly the box.
    let shape = [1, 4, 4];
    let (mut x, _) = batch(2, shape);
    let original = x.clone();
    let bx = regimen::data::augment::CutBox {
        y0: 1,
        y1: 3,
        x0: 0,
        x1: 2,
    };
    paste_box(&mut x, &original, &[1, 0], shape, bx);
    let want: Vec<f32> = (0..16)
        .map(|k| if [4, 5, 8, 9].contains(&k) { 2.0 } else { 1.0 })
        .collect();
    assert_eq!(&x[..16], &want[..]);
}

#[test]
fn pipelines_parse_and_reject_bad_specs() {
    let p = Pipeline::parse("crop=2,flip,cutmix=1.0").unwrap();
    assert_eq!(
        p.steps,
        vec![
            Augment::Crop { pad: 2 },
            Augment::Flip { p: 0.5 },
            Augment::CutMix { alpha: 1.0 }
        ]
    );
    assert!(p.mixes());
    assert!(Pipeline::parse("").unwrap().is_empty() && Pipeline::parse("none").unwrap().is_empty());
    for (spec, needle) in [
        ("crop=x", "augment crop = x: is not a whole number"),
        ("flip=2", "must be in [0, 1]"),
        ("blur", "expected crop, flip"),
        ("mixup=0", "augment mixup = 0"),
    ] {
        let err = Pipeline::parse(spec).unwrap_err().to_string();
        assert!(err.contains(needle), "{spec}: {err}");
    }
}

#[test]
fn the_loader_is_reproducible_whatever_the_threads() {
    let n = 50;
    let shape = [1, 6, 6];
    let data = Arc::new(Dataset {
        images: (0..n * 36).map(|i| (i % 97) as f32 / 97.0).collect(),
        labels: (0..n as u32).map(|i| i % 3).collect(),
        image_shape: shape,
        class_names: vec!["a".into(), "b".into(), "c".into()],
    });
    let run = |workers: usize, epoch: usize| {
        let l = Loader {
            pipeline: Arc::new(Pipeline::parse("crop=1,flip,noise=0.1,mixup").unwrap()),
            workers,
            ..Loader::new(data.clone(), 8, 7)
        };
        l.epoch(epoch).collect::<Vec<_>>()
    };
    let a = run(0, 0);
    assert_eq!(a.len(), 7);
    assert_eq!(a.last().unwrap().shape, [2, 1, 6, 6]);
    assert_eq!(a, run(1, 0));
    assert_eq!(a, run(3, 0));
    assert_ne!(a, run(1, 1), "another epoch, another order and other draws");
    // Every sample once per epoch.
    let l = Loader {
        workers: 2,
        ..Loader::new(data.clone(), 8, 7)
    };
    let mut seen: Vec<f32> = l
        .epoch(0)
        .flat_map(|b| b.images.chunks(36).map(|c| c[0]).collect::<Vec<_>>())
        .collect();
    seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut want: Vec<f32> = data.images.chunks(36).map(|c| c[0]).collect();
    want.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(seen, want);
    // Dropping an epoch early stops its workers (the test would hang otherwise).
    let mut e = l.epoch(1);
    e.next();
    drop(e);
}

#[test]
fn scale_keeps_a_constant_image_constant_up_to_the_borders() {
    // Bilinear resampling of a constant image is that constant everywhere, borders included.
    let shape = [1, 28, 28];
    let p = Pipeline::parse("scale=0.09").unwrap();
    let mut rng = Rng::new(3);
    for _ in 0..50 {
        let mut img = vec![1.0f32; 784];
        p.apply(&mut img, shape, &[0], 1, &mut rng);
        assert!(
            img.iter().all(|&v| (v - 1.0).abs() < 1e-6),
            "min {}",
            img.iter().cloned().fold(1.0, f32::min)
        );
    }
}

#[test]
fn spatial_augmentation_of_feature_vectors_is_refused() {
    let p = Pipeline::parse("crop=2").unwrap();
    let err = p.check_image_shape([50, 1, 1]).unwrap_err().to_string();
    assert!(
        err.contains("spatial transform") && err.contains("[50, 1, 1]"),
        "{err}"
    );
    assert!(Pipeline::parse("noise,mixup")
        .unwrap()
        .check_image_shape([50, 1, 1])
        .is_ok());
    assert!(p.check_image_shape([1, 28, 28]).is_ok());
}

#[test]
fn a_panicking_worker_is_not_a_short_epoch() {
    // 40 labels but only 39 images: building the last batch panics inside a worker.
    let data = Arc::new(Dataset {
        images: vec![0.5; 39 * 4],
        labels: vec![0; 40],
        image_shape: [1, 2, 2],
        class_names: vec!["a".into()],
    });
    let l = Loader {
        workers: 2,
        shuffle: false,
        ..Loader::new(data, 4, 0)
    };
    // The failure this guards against is a consumer waiting for ever on a dead worker: the
    // epoch runs in a thread of its own, and 60 seconds without an answer is a failure.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.epoch(0).count()));
        let _ = tx.send(r.ok());
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the epoch hung instead of re-raising the worker's panic");
    assert!(
        result.is_none(),
        "the epoch must not end quietly after {result:?} batches"
    );
}
