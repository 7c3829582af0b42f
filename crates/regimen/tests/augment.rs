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

// ---- The batch steps of the on-device loader (run here on the CPU backend; the GPU's are
// compared with these in tests/conformance.rs).

mod device_steps {
    use regimen::backend::RandomKey;
    use regimen::data::augment::{apply_one, device_sample_stream, DevicePlan};
    use regimen::data::{Augment, Pipeline};
    use regimen::rng::purpose;
    use regimen::{DType, Device, Indices, Rng, Tensor};

    const STREAM: u64 = 0x5EED_F0D1_CE00;

    fn key(step: &Indices, k: u32) -> RandomKey<'_> {
        RandomKey {
            stream: STREAM,
            step,
            purpose: purpose::AUGMENT_STEP + k,
        }
    }

    #[test]
    fn the_device_plan_takes_a_leading_crop_and_flip_into_the_gather() {
        let plan = |s: &str| Pipeline::parse(s).unwrap().device_plan();
        assert_eq!(
            plan("crop=3,flip=0.25,cutout=5,mixup=0.4,cutmix,cutout=2"),
            DevicePlan {
                pad: 3,
                flip_p: 0.25,
                after: vec![
                    Augment::Cutout { size: 5 },
                    Augment::Mixup { alpha: 0.4 },
                    Augment::CutMix { alpha: 1.0 },
                    Augment::Cutout { size: 2 },
                ],
            }
        );
        let plain = DevicePlan {
            pad: 0,
            flip_p: 0.0,
            after: vec![],
        };
        assert_eq!(plan("none"), plain);
        assert!(plan("mixup").mixes() && !plan("crop,cutout").mixes());
        // A crop or flip after another step, or a second one, runs as a batch step.
        assert_eq!(
            plan("rotate=10,crop=2,flip,flip").after,
            vec![
                Augment::Rotate { degrees: 10.0 },
                Augment::Crop { pad: 2 },
                Augment::Flip { p: 0.5 },
                Augment::Flip { p: 0.5 },
            ]
        );
        let p = plan("flip=0.3,crop=1,crop=2,noise");
        assert_eq!((p.pad, p.flip_p), (1, 0.3));
        assert_eq!(
            p.after,
            vec![Augment::Crop { pad: 2 }, Augment::Noise { std: 0.1 }]
        );
    }

    fn images(b: usize, shape: [usize; 3]) -> Tensor {
        let n = b * shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n)
            .map(|i| 1.0 + (i as f32 * 0.731).sin().abs())
            .collect();
        Tensor::from_host(&[b, shape[0], shape[1], shape[2]], v, Device::Cpu).unwrap()
    }

    /// Every per-image step on the device: sample `i` is the host's transform of the image with
    /// the numbers of its own stream, and the samples draw different numbers.
    #[test]
    fn device_per_image_steps_are_the_host_transforms_with_each_samples_numbers() {
        let (b, shape) = (6, [2usize, 9, 7]);
        let per: usize = shape.iter().product();
        let be = Device::Cpu.backend();
        let step = Indices::from_host(vec![11], Device::Cpu);
        for a in [
            Augment::Crop { pad: 2 },
            Augment::Translate { pixels: 3 },
            Augment::Flip { p: 0.5 },
            Augment::Scale { min_area: 0.3 },
            Augment::Rotate { degrees: 30.0 },
            Augment::Noise { std: 0.2 },
            Augment::Cutout { size: 4 },
        ] {
            let x0 = images(b, shape);
            let mut x = x0.clone();
            be.augment_samples(&mut x, a, key(&step, 2));
            let (before, after) = (x0.to_vec(), x.to_vec());
            let mut outcomes = Vec::new();
            for i in 0..b {
                let mut want = before[i * per..(i + 1) * per].to_vec();
                let stream = device_sample_stream(STREAM, i);
                let mut rng = Rng::philox(stream, 11, purpose::AUGMENT_STEP + 2);
                apply_one(a, &mut want, shape, &mut rng);
                let got = &after[i * per..(i + 1) * per];
                assert_eq!(got, &want[..], "{a:?}, sample {i}");
                outcomes.push(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
            outcomes.sort();
            outcomes.dedup();
            // Six samples of one image each: with their own numbers, they come out differently
            // (a flip of probability 0.5 gives two outcomes).
            let kinds = if let Augment::Flip { .. } = a { 2 } else { 3 };
            assert!(
                outcomes.len() >= kinds,
                "{a:?}: {} outcomes",
                outcomes.len()
            );
        }
    }

    /// Independent of the host functions: a crop moves the whole image by one offset, the
    /// noise has the asked deviation, Cutout zeroes one square of the asked side at most.
    #[test]
    fn device_per_image_steps_do_what_they_say() {
        let be = Device::Cpu.backend();
        let step = Indices::from_host(vec![4], Device::Cpu);
        // Crop: each sample is its image shifted by some (dy, dx) in [-2, 2], zeros outside.
        let (b, shape) = (5, [1usize, 8, 8]);
        let x0 = images(b, shape);
        let mut x = x0.clone();
        be.augment_samples(&mut x, Augment::Crop { pad: 2 }, key(&step, 0));
        let (src, out) = (x0.to_vec(), x.to_vec());
        for i in 0..b {
            let (s, o) = (&src[i * 64..(i + 1) * 64], &out[i * 64..(i + 1) * 64]);
            let fits = |dy: i32, dx: i32| {
                (0..8).all(|y| {
                    (0..8).all(|x| {
                        let (sy, sx) = (y + dy, x + dx);
                        let want = if (0..8).contains(&sy) && (0..8).contains(&sx) {
                            s[(sy * 8 + sx) as usize]
                        } else {
                            0.0
                        };
                        o[(y * 8 + x) as usize] == want
                    })
                })
            };
            let found = (-2..=2).flat_map(|dy| (-2..=2).map(move |dx| (dy, dx)));
            assert_eq!(
                found.filter(|&(dy, dx)| fits(dy, dx)).count(),
                1,
                "sample {i}"
            );
        }
        // Noise: mean 0, deviation 0.5 over 64 x 32 x 32 values.
        let mut x = Tensor::zeros(&[64, 1, 32, 32], Device::Cpu);
        be.augment_samples(&mut x, Augment::Noise { std: 0.5 }, key(&step, 1));
        let v = x.to_vec();
        let n = v.len() as f64;
        let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 0.01 && (sd - 0.5).abs() < 0.01,
            "mean {mean}, sd {sd}"
        );
        // Cutout: the zeros of each sample are one square of side 4 (clipped at the border).
        let mut x = Tensor::full(&[20, 2, 9, 9], 1.0, Device::Cpu);
        be.augment_samples(&mut x, Augment::Cutout { size: 4 }, key(&step, 2));
        let v = x.to_vec();
        for i in 0..20 {
            let img = &v[i * 162..(i + 1) * 162];
            let zero: Vec<(usize, usize)> = (0..81)
                .filter(|&k| img[k] == 0.0)
                .map(|k| (k / 9, k % 9))
                .collect();
            assert!(!zero.is_empty(), "sample {i}: a square was cut");
            let rows = zero
                .iter()
                .map(|z| z.0)
                .collect::<std::collections::BTreeSet<_>>();
            let cols = zero
                .iter()
                .map(|z| z.1)
                .collect::<std::collections::BTreeSet<_>>();
            assert!(rows.len() <= 4 && cols.len() <= 4);
            assert_eq!(
                zero.len(),
                rows.len() * cols.len(),
                "sample {i}: a rectangle"
            );
            assert_eq!(
                &img[81..],
                &img[..81],
                "sample {i}: the same square in both channels"
            );
        }
    }

    /// `x` `[B, C, H, W]` with sample `i` all `i + 1`, labels `i % 10`, soft labels one-hot.
    fn batch(b: usize, shape: [usize; 3]) -> (Tensor, Indices, Tensor) {
        let per: usize = shape.iter().product();
        let x: Vec<f32> = (0..b * per).map(|e| (e / per + 1) as f32).collect();
        let [c, h, w] = shape;
        let x = Tensor::from_host(&[b, c, h, w], x, Device::Cpu).unwrap();
        let y = Indices::from_host((0..b as u32).map(|i| i % 10).collect(), Device::Cpu);
        let mut soft = Tensor::zeros(&[b, 10], Device::Cpu);
        Device::Cpu.backend().one_hot(&y, &mut soft);
        (x, y, soft)
    }

    #[test]
    fn device_mixup_mixes_each_sample_with_its_mirror_and_the_labels_alike() {
        let (b, shape) = (7, [2, 3, 3]); // odd: the middle sample pairs with itself
        let per = 18;
        let (mut x, y, mut soft) = batch(b, shape);
        let x0 = x.to_vec();
        let s0 = soft.to_vec();
        assert_eq!(s0.iter().sum::<f32>(), b as f32);
        assert_eq!(s0[3 * 10 + 3], 1.0, "one-hot of label 3");
        let step = Indices::from_host(vec![5], Device::Cpu);
        let be = Device::Cpu.backend();
        be.mix_batch(&mut x, &mut soft, 0.4, false, key(&step, 1));
        let lam = Rng::philox(STREAM, 5, purpose::AUGMENT_STEP + 1).beta(0.4, 0.4) as f32;
        assert!(lam > 0.0 && lam < 1.0);
        let (xs, ss) = (x.to_vec(), soft.to_vec());
        for i in 0..b {
            let j = b - 1 - i;
            for r in 0..per {
                assert_eq!(
                    xs[i * per + r],
                    lam * x0[i * per + r] + (1.0 - lam) * x0[j * per + r],
                    "sample {i} element {r}"
                );
            }
            for k in 0..10 {
                assert_eq!(
                    ss[i * 10 + k],
                    lam * s0[i * 10 + k] + (1.0 - lam) * s0[j * 10 + k]
                );
            }
            let row: f32 = ss[i * 10..(i + 1) * 10].iter().sum();
            assert!((row - 1.0).abs() < 1e-6, "row {i} sums to {row}");
        }
        let _ = y;
    }

    #[test]
    fn device_cutmix_swaps_one_box_and_weights_labels_by_pixel_share() {
        let (b, shape) = (8, [3, 10, 12]);
        let [c, h, w] = shape;
        let per = c * h * w;
        let be = Device::Cpu.backend();
        let mut shares = Vec::new();
        for s in 0..20u32 {
            let (mut x, _, mut soft) = batch(b, shape);
            let step = Indices::from_host(vec![s], Device::Cpu);
            be.mix_batch(&mut x, &mut soft, 1.0, true, key(&step, 0));
            let (xs, ss) = (x.to_vec(), soft.to_vec());
            // The pixels taken from the partner: one box, the same in every sample and channel.
            let taken = |i: usize| -> Vec<bool> {
                let j = b - 1 - i;
                (0..per)
                    .map(|r| {
                        let v = xs[i * per + r];
                        assert!(
                            v == (i + 1) as f32 || v == (j + 1) as f32,
                            "a pixel of i or j"
                        );
                        v == (j + 1) as f32
                    })
                    .collect()
            };
            let first = taken(0);
            for i in 1..b {
                assert_eq!(taken(i), first, "step {s}: sample {i} has the same box");
            }
            let area = first.iter().filter(|&&t| t).count() / c;
            let rows: Vec<usize> = (0..h)
                .filter(|&y| (0..w).any(|x| first[y * w + x]))
                .collect();
            let cols: Vec<usize> = (0..w)
                .filter(|&x| (0..h).any(|y| first[y * w + x]))
                .collect();
            assert_eq!(area, rows.len() * cols.len(), "step {s}: a rectangle");
            // The label weight is the share of the sample's own pixels (labels i % 10 differ
            // within each pair of this batch).
            let own = 1.0 - area as f32 / (h * w) as f32;
            for i in 0..b {
                let j = b - 1 - i;
                assert_eq!(ss[i * 10 + i % 10], own, "step {s}: weight of sample {i}");
                assert_eq!(ss[i * 10 + j % 10], 1.0 - own);
            }
            shares.push(own);
        }
        assert!(
            shares.iter().any(|&s| s < 0.9) && shares.iter().any(|&s| s > 0.1),
            "boxes of many sizes: {shares:?}"
        );
    }

    /// Mixup's weight on the device is Beta(alpha, alpha): its mean and variance over many
    /// steps (read off a pair of images 1 and 0).
    #[test]
    fn device_mixup_weight_is_beta_distributed() {
        let be = Device::Cpu.backend();
        for alpha in [0.2f32, 1.0, 4.0] {
            let n = 4000;
            let lams: Vec<f64> = (0..n)
                .map(|s| {
                    let mut x =
                        Tensor::from_host(&[2, 1, 1, 2], vec![1.0, 1.0, 0.0, 0.0], Device::Cpu)
                            .unwrap();
                    let mut soft = be.zeros(&[2, 1], DType::F32);
                    let step = Indices::from_host(vec![s], Device::Cpu);
                    be.mix_batch(&mut x, &mut soft, alpha, false, key(&step, 3));
                    x.to_vec()[0] as f64
                })
                .collect();
            let mean = lams.iter().sum::<f64>() / n as f64;
            let var = lams.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64;
            let want = 1.0 / (4.0 * (2.0 * alpha as f64 + 1.0));
            assert!((mean - 0.5).abs() < 0.025, "alpha {alpha}: mean {mean}");
            assert!(
                (var / want - 1.0).abs() < 0.1,
                "alpha {alpha}: variance {var}, want {want}"
            );
        }
    }
}
