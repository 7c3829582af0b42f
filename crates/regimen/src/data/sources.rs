//! Finding and loading the datasets by name.
//!
//! | name | files | where |
//! |---|---|---|
//! | `digits` | embedded | always (1,438 train / 359 test, a fixed seeded split) |
//! | `fashion-mnist` | `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...` | see below |
//! | `mnist` | the same names | see below |
//! | `cifar10` | `data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin` | see below |
//!
//! Files are looked for in the directory given (`--data-dir`), else in `$REGIMEN_DATA`, else
//! in `/usr/share/datasets/<name>/` (where Debian's `dataset-fashion-mnist` puts them); in
//! each, directly or in a sub-directory named like the dataset (`cifar-10-batches-bin` too).
//! Pixels are scaled to `[0, 1]`.

use std::path::{Path, PathBuf};

use super::{cifar, idx, Dataset};
use crate::error::{Error, Result};

/// A dataset's training and test splits, and where they came from.
#[derive(Clone, Debug)]
pub struct Splits {
    pub name: String,
    pub train: Dataset,
    pub test: Dataset,
    /// The directory the files were read from (or "embedded").
    pub source: String,
}

pub const DATASETS: &[&str] = &["digits", "fashion-mnist", "mnist", "cifar10"];

pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
pub const CIFAR_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The environment variable naming a data directory.
pub const DATA_ENV: &str = "REGIMEN_DATA";

/// The directories searched for `name`, in order.
pub fn search_dirs(name: &str, data_dir: Option<&Path>) -> Vec<PathBuf> {
    let subdirs: &[&str] = if name == "cifar10" {
        &["cifar10", "cifar-10-batches-bin"]
    } else {
        &[name]
    };
    let roots: Vec<PathBuf> = match (data_dir, std::env::var_os(DATA_ENV)) {
        (Some(d), _) => vec![d.to_path_buf()],
        (None, Some(env)) => vec![PathBuf::from(env)],
        (None, None) => vec![PathBuf::from("/usr/share/datasets")],
    };
    let mut dirs = Vec::new();
    for r in roots {
        if data_dir.is_some() || std::env::var_os(DATA_ENV).is_some() {
            dirs.push(r.clone());
        }
        for s in subdirs {
            dirs.push(r.join(s));
            if name == "cifar10" {
                dirs.push(r.join(s).join("cifar-10-batches-bin"));
            }
        }
    }
    dirs
}

/// The first of `dirs` holding every file of `stems` (each raw or `.gz`), with the paths.
fn find_all(dirs: &[PathBuf], stems: &[&str]) -> Option<(PathBuf, Vec<PathBuf>)> {
    dirs.iter().find_map(|d| {
        let found: Option<Vec<PathBuf>> = stems
            .iter()
            .map(|s| {
                [d.join(s), d.join(format!("{s}.gz"))]
                    .into_iter()
                    .find(|p| p.is_file())
            })
            .collect();
        found.map(|f| (d.clone(), f))
    })
}

/// The first folder of `dirs` that holds some of the files but not all: which are missing.
fn incomplete(name: &str, dirs: &[PathBuf], stems: &[&str]) -> Option<Error> {
    dirs.iter().find_map(|d| {
        let missing: Vec<&str> = stems
            .iter()
            .copied()
            .filter(|s| !d.join(s).is_file() && !d.join(format!("{s}.gz")).is_file())
            .collect();
        (!missing.is_empty() && missing.len() < stems.len()).then(|| Error::Data {
            file: d.display().to_string(),
            reason: format!(
                "{name} is incomplete here: no {} (the other files are there)",
                missing
                    .iter()
                    .map(|m| format!("{m}[.gz]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    })
}

fn not_found(name: &str, dirs: &[PathBuf], files: &str) -> Error {
    let hint = if name == "fashion-mnist" {
        " (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
    } else {
        ""
    };
    Error::Data {
        file: dirs.first().map(|d| d.display().to_string()).unwrap_or_default(),
        reason: format!(
            "{name} not found: looked for {files} in {}; give --data-dir DIR or set {DATA_ENV}{hint}",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn idx_split(images: &Path, labels: &Path, classes: &[&str]) -> Result<Dataset> {
    let (pixels, n, h, w) = idx::read_images(images)?;
    let labels_raw = idx::read_labels(labels)?;
    if labels_raw.len() != n {
        return Err(Error::Data {
            file: labels.display().to_string(),
            reason: format!(
                "{} labels for the {n} images of {}",
                labels_raw.len(),
                images.display()
            ),
        });
    }
    if let Some((i, &l)) = labels_raw
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes.len())
    {
        return Err(Error::Data {
            file: labels.display().to_string(),
            reason: format!("label {l} of item {i} is out of range 0..{}", classes.len()),
        });
    }
    Ok(Dataset {
        images: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: labels_raw.iter().map(|&l| l as u32).collect(),
        image_shape: [1, h, w],
        class_names: classes.iter().map(|s| s.to_string()).collect(),
    })
}

fn cifar_split(paths: &[PathBuf]) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for p in paths {
        let (px, lb) = cifar::read_batch(p)?;
        images.extend(px.iter().map(|&v| v as f32 / 255.0));
        labels.extend(lb.iter().map(|&l| l as u32));
    }
    Ok(Dataset {
        images,
        labels,
        image_shape: [3, 32, 32],
        class_names: CIFAR_CLASSES.iter().map(|s| s.to_string()).collect(),
    })
}

/// Load the dataset `name` (one of [`DATASETS`]). The training and test splits must hold
/// images of one shape and one set of classes.
pub fn load(name: &str, data_dir: Option<&Path>) -> Result<Splits> {
    let s = load_splits(name, data_dir)?;
    if s.train.image_shape != s.test.image_shape {
        return Err(Error::Data {
            file: s.source.clone(),
            reason: format!(
                "the training images are {:?} but the test images are {:?}",
                s.train.image_shape, s.test.image_shape
            ),
        });
    }
    Ok(s)
}

fn load_splits(name: &str, data_dir: Option<&Path>) -> Result<Splits> {
    let splits = |train, test, source: &Path| Splits {
        name: name.to_string(),
        train,
        test,
        source: source.display().to_string(),
    };
    match name {
        "digits" => {
            let (train, test) = super::digits()?.split(0.2, 0)?;
            Ok(Splits {
                name: name.into(),
                train,
                test,
                source: "embedded".into(),
            })
        }
        "fashion-mnist" | "mnist" => {
            let dirs = search_dirs(name, data_dir);
            let stems = [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ];
            let (dir, f) = find_all(&dirs, &stems).ok_or_else(|| {
                incomplete(name, &dirs, &stems).unwrap_or_else(|| {
                    not_found(
                        name,
                        &dirs,
                        "train-images-idx3-ubyte[.gz] and the other three IDX files",
                    )
                })
            })?;
            let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
            let names: Vec<&str> = if name == "mnist" {
                digits.iter().map(String::as_str).collect()
            } else {
                FASHION_CLASSES.to_vec()
            };
            let mut found = splits(
                idx_split(&f[0], &f[1], &names)?,
                idx_split(&f[2], &f[3], &names)?,
                &dir,
            );
            // Both forms of a file in one folder: say which is read (the uncompressed one),
            // since the two may differ.
            if f.iter().any(|p| {
                p.extension().is_none_or(|e| e != "gz")
                    && p.with_file_name(format!(
                        "{}.gz",
                        p.file_name().unwrap_or_default().to_string_lossy()
                    ))
                    .is_file()
            }) {
                found.source +=
                    " (the uncompressed IDX files; the .gz copies beside them are not read)";
            }
            Ok(found)
        }
        "cifar10" => {
            let dirs = search_dirs(name, data_dir);
            let stems = [
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
                "test_batch.bin",
            ];
            let found = find_all(&dirs, &stems[5..]).map(|(d, _)| d);
            let dir = found.ok_or_else(|| {
                not_found(
                    name,
                    &dirs,
                    "test_batch.bin and data_batch_1.bin ... data_batch_5.bin",
                )
            })?;
            // Training batches: all five are expected; a missing one is an error, not a smaller set.
            let train: Vec<PathBuf> = stems[..5].iter().map(|s| dir.join(s)).collect();
            if let Some(missing) = train.iter().find(|p| !p.is_file()) {
                return Err(Error::Data {
                    file: missing.display().to_string(),
                    reason: "missing: CIFAR-10 needs data_batch_1.bin ... data_batch_5.bin".into(),
                });
            }
            Ok(splits(
                cifar_split(&train)?,
                cifar_split(&[dir.join("test_batch.bin")])?,
                &dir,
            ))
        }
        other => Err(Error::config(
            "dataset",
            other,
            &format!("expected one of {}", DATASETS.join(", ")),
        )),
    }
}
