//! Data: IDX and CIFAR-10 parsers on well-formed, truncated and corrupted files; the real
//! Fashion-MNIST when installed; preprocessing statistics against numpy.

use std::io::Write;
use std::path::{Path, PathBuf};

use regimen::data::{self, idx, Dataset, PreprocessKind, Preprocessor};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("regimen-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny Fashion-MNIST-shaped dataset: `n` train and `n / 2` test images of 3x2 pixels.
fn write_idx_set(dir: &Path, n: usize, gz: bool) {
    let write = |name: &str, dims: &[usize], data: &[u8]| {
        let path = dir.join(name);
        idx::write(&path, dims, data).unwrap();
        if gz {
            let raw = std::fs::read(&path).unwrap();
            let mut e = flate2::write::GzEncoder::new(
                std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap(),
                flate2::Compression::fast(),
            );
            e.write_all(&raw).unwrap();
            e.finish().unwrap();
            std::fs::remove_file(&path).unwrap();
        }
    };
    for (split, count) in [("train", n), ("t10k", n / 2)] {
        let pixels: Vec<u8> = (0..count * 6).map(|i| (i * 7 % 256) as u8).collect();
        let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
        write(
            &format!("{split}-images-idx3-ubyte"),
            &[count, 3, 2],
            &pixels,
        );
        write(&format!("{split}-labels-idx1-ubyte"), &[count], &labels);
    }
}

#[test]
fn idx_files_raw_and_gzip_load_with_names_and_scaling() {
    for gz in [false, true] {
        let dir = tmpdir(&format!("idx{gz}"));
        write_idx_set(&dir, 20, gz);
        let s = data::load("fashion-mnist", Some(&dir)).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (20, 10));
        assert_eq!(s.train.image_shape, [1, 3, 2]);
        assert_eq!(s.train.class_names[9], "Ankle boot");
        assert_eq!(s.train.labels[..3], [0, 1, 2]);
        assert_eq!(s.train.images[1], 7.0 / 255.0);
        assert_eq!(s.source, dir.display().to_string());
    }
}

/// A folder with both the raw and the gzipped files reads the raw ones and says so.
#[test]
fn raw_and_gzip_side_by_side_say_which_is_read() {
    let dir = tmpdir("idx-both");
    write_idx_set(&dir, 20, false);
    let gz = tmpdir("idx-both-gz");
    write_idx_set(&gz, 20, true);
    for e in std::fs::read_dir(&gz).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let s = data::load("fashion-mnist", Some(&dir)).unwrap();
    assert_eq!(
        s.source,
        format!(
            "{} (the uncompressed IDX files; the .gz copies beside them are not read)",
            dir.display()
        )
    );
}

fn expect_error(dir: &Path, needle: &str) {
    let err = data::load("fashion-mnist", Some(dir))
        .unwrap_err()
        .to_string();
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// gzip: several members one after the other are one valid file; a stream corrupted in the
/// middle is reported as corrupt data, not as a size problem.
#[test]
fn gzip_members_and_corruption() {
    let dir = tmpdir("gz");
    write_idx_set(&dir, 20, true);
    let path = dir.join("train-images-idx3-ubyte.gz");
    let whole = std::fs::read(&path).unwrap();
    let raw = {
        let mut d = flate2::read::GzDecoder::new(&whole[..]);
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut v).unwrap();
        v
    };
    let member = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let two = [member(&raw[..50]), member(&raw[50..])].concat();
    std::fs::write(&path, &two).unwrap();
    let s = data::load("fashion-mnist", Some(&dir)).unwrap();
    assert_eq!(s.train.len(), 20, "a two-member gzip loads");
    let mut bad = whole.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xFF;
    bad[mid + 1] ^= 0x5A;
    std::fs::write(&path, &bad).unwrap();
    let err = data::load("fashion-mnist", Some(&dir))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt") || err.contains("truncated"),
        "{err}"
    );
    assert!(!err.contains("after the"), "not a size complaint: {err}");
}

/// Training and test images of different sizes are refused when the dataset loads.
#[test]
fn splits_of_different_image_sizes_are_refused() {
    let dir = tmpdir("sizes");
    write_idx_set(&dir, 20, false);
    idx::write(&dir.join("t10k-images-idx3-ubyte"), &[10, 2, 3], &[0; 60]).unwrap();
    expect_error(
        &dir,
        "the training images are [1, 3, 2] but the test images are [1, 2, 3]",
    );
}

#[test]
fn corrupted_idx_files_are_clear_errors() {
    let dir = tmpdir("bad");
    write_idx_set(&dir, 20, false);
    let images = dir.join("train-images-idx3-ubyte");
    let good = std::fs::read(&images).unwrap();

    std::fs::write(&images, &good[..good.len() - 5]).unwrap();
    expect_error(
        &dir,
        "truncated: the header announces 120 bytes of data, the file has 115",
    );
    let mut extra = good.clone();
    extra.push(0);
    std::fs::write(&images, &extra).unwrap();
    expect_error(
        &dir,
        "1 bytes after the 120 bytes of data the header announces",
    );
    // A header that claims 10,000,000 images of 20x20 (4 GB) in a file of a few bytes: a clear
    // error, with nothing allocated for the claim (the buffer grows as bytes arrive).
    let mut liar = good[..4].to_vec();
    for d in [10_000_000u32, 20, 20] {
        liar.extend_from_slice(&d.to_be_bytes());
    }
    liar.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&images, &liar).unwrap();
    expect_error(
        &dir,
        "truncated: the header announces 4000000000 bytes of data, the file has 3",
    );
    let mut magic = good.clone();
    magic[3] = 1;
    std::fs::write(&images, &magic).unwrap();
    expect_error(&dir, "bad magic number 00000801: expected 00000803");
    // 4 billion images of 4096 x 4096: refused from the header, before any allocation.
    let mut absurd = good.clone();
    absurd[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&images, &absurd).unwrap();
    expect_error(&dir, "absurd dimensions");
    std::fs::write(&images, &good[..3]).unwrap();
    expect_error(&dir, "truncated: the header");
    std::fs::write(&images, &good).unwrap();

    let labels = dir.join("train-labels-idx1-ubyte");
    idx::write(&labels, &[19], &[0; 19]).unwrap();
    expect_error(&dir, "19 labels for the 20 images");
    idx::write(&labels, &[20], &[[0u8; 19].as_slice(), &[10]].concat()).unwrap();
    expect_error(&dir, "label 10 of item 19 is out of range");

    std::fs::remove_file(&labels).unwrap();
    expect_error(
        &dir,
        "fashion-mnist is incomplete here: no train-labels-idx1-ubyte[.gz] (the other files are there)",
    );
    expect_error(&dir, &dir.display().to_string());
    for f in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    expect_error(&dir, "fashion-mnist not found");
    let err = data::load("imagenet", None).unwrap_err().to_string();
    assert!(
        err.contains("expected one of digits, fashion-mnist, mnist, cifar10"),
        "{err}"
    );
}

#[test]
fn cifar10_batches_in_the_exact_format() {
    let dir = tmpdir("cifar").join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let record = |label: u8, seed: usize| -> Vec<u8> {
        std::iter::once(label)
            .chain((0..3072).map(|i| ((i + seed) % 251) as u8))
            .collect()
    };
    for b in 1..=5 {
        let data: Vec<u8> = (0..4)
            .flat_map(|i| record(((b + i) % 10) as u8, b * 10 + i))
            .collect();
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), data).unwrap();
    }
    std::fs::write(
        dir.join("test_batch.bin"),
        [record(3, 0), record(9, 1)].concat(),
    )
    .unwrap();
    let root = dir.parent().unwrap();
    let s = data::load("cifar10", Some(root)).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (20, 2));
    assert_eq!(s.train.image_shape, [3, 32, 32]);
    assert_eq!(s.test.labels, vec![3, 9]);
    assert_eq!(s.test.class_names[3], "cat");
    // Channel planes in order: the green plane of test image 0 starts at byte 1024.
    assert_eq!(s.test.images[1024], (1024 % 251) as f32 / 255.0);

    std::fs::write(dir.join("test_batch.bin"), &record(3, 0)[..3000]).unwrap();
    let err = data::load("cifar10", Some(root)).unwrap_err().to_string();
    assert!(
        err.contains("test_batch.bin") && err.contains("not a whole number of 3073-byte records"),
        "{err}"
    );
    std::fs::write(dir.join("test_batch.bin"), record(12, 0)).unwrap();
    let err = data::load("cifar10", Some(root)).unwrap_err().to_string();
    assert!(err.contains("label 12 out of range"), "{err}");
    std::fs::write(dir.join("test_batch.bin"), record(1, 0)).unwrap();
    std::fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    let err = data::load("cifar10", Some(root)).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_4.bin") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!(
            "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): skipped"
        );
        return;
    }
    let s = data::load("fashion-mnist", Some(dir)).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
    let mut counts = [0; 10];
    s.train.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [6000; 10]);
    assert_eq!(s.train.labels[..5], [9, 0, 0, 3, 0]);
    // Raw pixel sums of known images (numpy on the same files).
    let raw_sum = |d: &Dataset, i: usize| {
        (d.images[i * 784..(i + 1) * 784].iter().sum::<f32>() * 255.0).round() as i64
    };
    assert_eq!(
        (
            raw_sum(&s.train, 0),
            raw_sum(&s.train, 59_999),
            raw_sum(&s.test, 0)
        ),
        (76_247, 16_684, 33_456)
    );
    let (m, sd) = s.train.pixel_mean_std();
    assert!(
        (m - 0.286_040_6).abs() < 1e-5 && (sd - 0.353_024_24).abs() < 1e-5,
        "{m} {sd}"
    );
}

/// 10 images of 3x2x2 with `x[i] = sin(0.37 i) + 0.1 (i mod 7)` over the flat index.
fn synthetic() -> Dataset {
    let images = (0..120)
        .map(|i| ((0.37 * i as f64).sin() + 0.1 * (i % 7) as f64) as f32)
        .collect();
    Dataset {
        images,
        labels: vec![0; 10],
        image_shape: [3, 2, 2],
        class_names: vec!["a".into()],
    }
}

#[test]
fn preprocessing_statistics_match_numpy() {
    // numpy: x = (np.sin(0.37*i) + 0.1*(i % 7)).astype(np.float32).reshape(10, 3, 2, 2)
    let d = synthetic();
    let close = |a: f32, b: f64| assert!((a as f64 - b).abs() < 2e-6, "{a} vs {b}");
    let p = Preprocessor::fit(PreprocessKind::Normalize, &d).unwrap();
    close(p.mean[0], 0.297_724_017_477_594_3); // x.mean()
    close(p.std[0], 0.732_026_497_106_703_5); // x.std()
    let p = Preprocessor::fit(PreprocessKind::PerChannel, &d).unwrap();
    assert_eq!((p.mean.len(), p.std.len()), (3, 3));
    for (a, b) in p.mean.iter().zip([
        0.276_303_326_152_265,
        0.298_068_886_017_426_87,
        0.318_799_840_263_091,
    ]) {
        close(*a, b); // x.mean(axis=(0, 2, 3))
    }
    for (a, b) in p.std.iter().zip([
        0.709_415_852_746_505_8,
        0.851_756_177_082_994_9,
        0.614_756_687_490_743_3,
    ]) {
        close(*a, b); // x.std(axis=(0, 2, 3))
    }
    let p = Preprocessor::fit(PreprocessKind::MeanImage, &d).unwrap();
    close(p.mean[0], 0.266_454_315_185_546_85);
    close(p.mean[5], 0.295_823_638_699_948_77);
    close(p.mean[11], 0.292_989_848_181_605_34);
    // np.linalg.eigh(X^T X / 10) of the centered data, largest first.
    let p = Preprocessor::fit(PreprocessKind::Pca(3), &d).unwrap();
    assert_eq!((p.eigenvalues.len(), p.components.len()), (3, 3 * 12));
    for (a, b) in p.eigenvalues.iter().zip([
        3.499_804_012_398_978,
        2.767_804_053_196_416,
        0.055_767_031_792_277_92,
    ]) {
        assert!(
            (*a as f64 - b).abs() < 1e-4 * b.max(0.1),
            "eigenvalue {a} vs {b}"
        );
    }
}

#[test]
fn preprocessing_is_fitted_on_train_and_applied_unchanged() {
    let train = synthetic();
    let mut a = train.clone();
    let p = Preprocessor::fit(PreprocessKind::PerChannel, &train).unwrap();
    p.apply(&mut a).unwrap();
    // Per channel: mean 0 and std 1 on the data it was fitted on.
    for ch in 0..3 {
        let v: Vec<f32> = a
            .images
            .chunks(12)
            .flat_map(|img| img[ch * 4..(ch + 1) * 4].to_vec())
            .collect();
        let m = v.iter().sum::<f32>() / v.len() as f32;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            m.abs() < 1e-6 && (s - 1.0).abs() < 1e-5,
            "channel {ch}: {m} {s}"
        );
    }
    // Another split gets the training statistics, not its own.
    let mut other = train.clone();
    other.images.iter_mut().for_each(|v| *v += 1.0);
    p.apply(&mut other).unwrap();
    assert!((other.images[0] - (a.images[0] + 1.0 / p.std[0])).abs() < 1e-5);
    // Whitening: the transformed training data has identity covariance on its components.
    let w = Preprocessor::fit(PreprocessKind::Whiten(2), &train).unwrap();
    let mut z = train.clone();
    w.apply(&mut z).unwrap();
    assert_eq!(z.image_shape, [2, 1, 1]);
    for (i, j) in [(0, 0), (1, 1), (0, 1)] {
        let c: f32 = z.images.chunks(2).map(|r| r[i] * r[j]).sum::<f32>() / 10.0;
        let want = if i == j { 1.0 } else { 0.0 };
        assert!((c - want).abs() < 1e-3, "cov[{i}{j}] = {c}");
    }
    let mut wrong = Dataset {
        images: vec![0.0; 8],
        labels: vec![0, 0],
        image_shape: [1, 2, 2],
        class_names: vec!["a".into()],
    };
    assert!(p
        .apply(&mut wrong)
        .unwrap_err()
        .to_string()
        .contains("[3, 2, 2]"));
    assert!(PreprocessKind::parse("pca").is_err() && PreprocessKind::parse("zca:3").is_err());
    assert_eq!(
        PreprocessKind::parse("whiten:5").unwrap(),
        PreprocessKind::Whiten(5)
    );
}

#[test]
fn fitted_preprocessing_saves_and_loads_exactly() {
    let d = synthetic();
    let dir = std::env::temp_dir().join(format!("regimen-pre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for kind in [
        PreprocessKind::Normalize,
        PreprocessKind::PerChannel,
        PreprocessKind::MeanImage,
        PreprocessKind::Whiten(3),
    ] {
        let p = Preprocessor::fit(kind, &d).unwrap();
        let path = dir.join("pre.safetensors");
        p.save(&path).unwrap();
        let q = Preprocessor::load(&path).unwrap();
        assert_eq!(p, q, "{kind:?}");
        let (mut a, mut b) = (d.clone(), d.clone());
        p.apply(&mut a).unwrap();
        q.apply(&mut b).unwrap();
        assert_eq!(a.images, b.images);
    }
    // A per-channel file with one mean for three channels is refused at load, not at apply.
    let mut short = Preprocessor::fit(PreprocessKind::PerChannel, &d).unwrap();
    short.mean.truncate(1);
    short.save(&dir.join("short.safetensors")).unwrap();
    let err = Preprocessor::load(&dir.join("short.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs 3 means and 3 stds, the file has 1 and 3"),
        "{err}"
    );
    std::fs::write(dir.join("junk.safetensors"), b"not a file").unwrap();
    let err = Preprocessor::load(&dir.join("junk.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
