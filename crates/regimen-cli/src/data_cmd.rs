//! `regimen data info` and `regimen data preview`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use regimen::data::{self, Dataset, Pipeline, Splits};
use regimen::png::Canvas;
use regimen::Rng;

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Where the files were found, counts per split and class, image shape, pixel mean/std.
    Info(Source),
    /// Download a dataset (fashion-mnist) into DIR/NAME, checking each file's SHA-256.
    Download {
        /// Only fashion-mnist has an official plain-HTTP location.
        #[arg(long, default_value = "fashion-mnist")]
        dataset: String,
        /// Where to put it (default: $REGIMEN_DATA, else ./data); the files go in DIR/NAME.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Base URL of the files (default: the official location; http:// only).
        #[arg(long)]
        url: Option<String>,
    },
    /// A PNG grid of real samples before (top row) and after (bottom row) an augmentation pipeline.
    Preview {
        #[command(flatten)]
        source: Source,
        /// The pipeline, like crop=2,flip,cutmix=1.0.
        #[arg(long, default_value = "crop=2,flip")]
        augment: String,
        /// The preprocessing the images get first, as in train (which augments preprocessed
        /// images: a crop's padding is 0 there, the mean pixel under normalize): normalize
        /// (train's default), none, or any --preprocess of train.
        #[arg(long, default_value = "normalize")]
        preprocess: String,
        /// The PNG file to write.
        #[arg(long)]
        out: PathBuf,
        /// How many samples, 1 to 64.
        #[arg(long, default_value_t = 8)]
        count: usize,
        /// Seed of the sample choice and the augmentation draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args, serde::Serialize)]
pub struct Source {
    /// digits (embedded), fashion-mnist, mnist or cifar10.
    #[arg(long, default_value = "digits")]
    pub dataset: String,
    /// Directory holding the dataset's files (else $REGIMEN_DATA, else /usr/share/datasets/NAME).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Source {
    /// Make a relative `--data-dir` absolute (when it exists), so that the run's config names
    /// the same folder from wherever the run is resumed or repeated.
    pub fn absolute_dir(&mut self) {
        if let Some(d) = &self.data_dir {
            if d.is_relative() {
                if let Ok(abs) = std::fs::canonicalize(d) {
                    self.data_dir = Some(abs);
                }
            }
        }
    }

    pub fn load(&self) -> Result<Splits> {
        let splits = data::load(&self.dataset, self.data_dir.as_deref())?;
        if let (Some(dir), "embedded") = (&self.data_dir, splits.source.as_str()) {
            tell!(
                "note: --data-dir {} is not read: {} is embedded in regimen",
                dir.display(),
                self.dataset
            );
        }
        Ok(splits)
    }
}

/// Samples `idx` of `d` before (top row) and after (bottom row) `pipeline`, with each augmented
/// sample's label(s) under it as CLASS:WEIGHT (Mixup and CutMix mix them).
pub fn preview(d: &Dataset, idx: &[usize], pipeline: &Pipeline, rng: &mut Rng) -> Canvas {
    let n = idx.len();
    let before = d.subset(idx);
    let mut after = before.images.clone();
    let soft = pipeline.apply(
        &mut after,
        d.image_shape,
        &before.labels,
        d.num_classes(),
        rng,
    );
    let [_, h, w] = d.image_shape;
    let scale = (96 / h.max(w)).max(1);
    let (cell_w, cell_h) = (w * scale + 8, h * scale + 8);
    let label_h = 3 * 5 * 2 + 8;
    let mut canvas = Canvas::new(cell_w * n + 8, 2 * cell_h + label_h + 8, [255, 255, 255]);
    let dim = d.image_len();
    // Normalized pixels (outside [0, 1]) are shown on the originals' range, black to white, the
    // same map for both rows (so a fill of 0 shows where the mean pixel sits).
    let (lo, hi) = before
        .images
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let rescale = |v: &[f32]| -> Vec<f32> {
        if (lo >= 0.0 && hi <= 1.0) || hi <= lo {
            v.to_vec()
        } else {
            v.iter().map(|&x| (x - lo) / (hi - lo)).collect()
        }
    };
    let (before_images, after) = (rescale(&before.images), rescale(&after));
    for i in 0..n {
        canvas.image(
            &before_images[i * dim..(i + 1) * dim],
            d.image_shape,
            8 + i * cell_w,
            8,
            scale,
        );
        canvas.image(
            &after[i * dim..(i + 1) * dim],
            d.image_shape,
            8 + i * cell_w,
            8 + cell_h,
            scale,
        );
        // Under each augmented sample: its label(s) as CLASS:WEIGHT, heaviest first.
        let mut parts: Vec<(usize, f32)> = match &soft {
            Some(y) => (0..d.num_classes())
                .map(|c| (c, y[i * d.num_classes() + c]))
                .filter(|&(_, w)| w > 0.005)
                .collect(),
            None => vec![(before.labels[i] as usize, 1.0)],
        };
        parts.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        for (line, (c, wgt)) in parts.iter().take(2).enumerate() {
            let text = if soft.is_some() {
                format!("{c}:{wgt:.2}")
            } else {
                format!("{c}")
            };
            canvas.text(
                &text,
                8 + i * cell_w,
                2 * cell_h + 4 + line * 14,
                2,
                [0, 0, 0],
            );
        }
    }
    canvas
}

fn describe(name: &str, d: &Dataset) {
    let mut counts = vec![0usize; d.num_classes()];
    d.labels.iter().for_each(|&l| counts[l as usize] += 1);
    let (m, s) = d.pixel_mean_std();
    say!("{name}: {} images, pixel mean {m:.4}, std {s:.4}", d.len());
    for (c, n) in counts.iter().enumerate() {
        say!("  {c:>2} {:<12} {n}", d.class_names[c]);
    }
}

pub fn run(cmd: &DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Download {
            dataset,
            data_dir,
            url,
        } => {
            if dataset != "fashion-mnist" {
                bail!("invalid --dataset {dataset:?}: only fashion-mnist can be downloaded (put other datasets' files in --data-dir)");
            }
            let root = data_dir
                .clone()
                .or_else(|| std::env::var_os(data::DATA_ENV).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("data"));
            let dir = root.join(dataset);
            let base = url
                .clone()
                .unwrap_or_else(|| data::download::FASHION_MNIST_URL.to_string());
            data::download::download(&base, &data::download::FASHION_MNIST_FILES, &dir, |m| {
                tell!("{m}")
            })?;
            say!(
                "{dataset} is in {} (use --data-dir {})",
                dir.display(),
                root.display()
            );
            Ok(())
        }
        DataCommand::Info(source) => {
            let s = source.load()?;
            say!("dataset {} from {}", s.name, s.source);
            say!(
                "image shape {:?} (C, H, W), {} classes",
                s.train.image_shape,
                s.train.num_classes()
            );
            describe("train", &s.train);
            describe("test", &s.test);
            Ok(())
        }
        DataCommand::Preview {
            source,
            augment,
            preprocess,
            out,
            count,
            seed,
        } => {
            let pipeline = Pipeline::parse(augment)?;
            let kind = regimen::data::PreprocessKind::parse(preprocess)?;
            if *count == 0 || *count > 64 {
                bail!("invalid --count {count}: must be in 1..=64");
            }
            if !out
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
            {
                bail!(
                    "--out {}: the preview is a PNG image: give a name ending in .png",
                    out.display()
                );
            }
            let s = source.load()?;
            let d = &s.train;
            // What train would refuse on these images (a Cutout larger than them).
            pipeline.check_image_shape(d.image_shape)?;
            let n = (*count).min(d.len());
            let mut rng = Rng::new(*seed);
            let idx: Vec<usize> = (0..n).map(|_| rng.below(d.len())).collect();
            // The samples as train augments them: preprocessed (fitted on the training split).
            let mut shown = d.subset(&idx);
            regimen::data::Preprocessor::fit(kind, d)?.apply(&mut shown)?;
            if shown.image_shape != d.image_shape {
                bail!(
                    "--preprocess {preprocess} turns each image into {} features: there is no image to augment or show",
                    shown.image_len()
                );
            }
            let canvas = preview(&shown, &(0..n).collect::<Vec<_>>(), &pipeline, &mut rng);
            canvas.save(out)?;
            say!(
                "wrote {} ({} samples of {}, top: original, bottom: {})",
                out.display(),
                n,
                s.name,
                if pipeline.is_empty() { "none" } else { augment }
            );
            let names: Vec<String> = d
                .class_names
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i}={c}"))
                .collect();
            say!(
                "labels under the samples are CLASS:WEIGHT; classes: {}",
                names.join(", ")
            );
            Ok(())
        }
    }
}
