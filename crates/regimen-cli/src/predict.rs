//! `regimen eval` (one checkpoint, or several as an ensemble) and `regimen predict` (classes and
//! probabilities of PNG or IDX images).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use regimen::data::Dataset;
use regimen::ensemble::{self, Member};
use regimen::{models, Rng};

use crate::data_cmd;

/// What a checkpoint says about the model it holds.
pub struct Described {
    pub member: Member,
    pub dataset: String,
    /// The `data_dir` of the run that wrote the checkpoint (its resolved config), if it named
    /// one.
    pub data_dir: Option<PathBuf>,
    pub input: [usize; 3],
    pub classes: usize,
}

/// A run folder stands for its best checkpoint.
fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("checkpoints").join("best.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// Rebuild the model a checkpoint of `regimen train` names and load it. The metadata is
/// checked against the tensors in the file before the model is built: a file claiming a huge
/// input or class count would otherwise allocate it.
pub fn load(path: &Path) -> Result<Described> {
    let folder = path.is_dir().then(|| path.to_path_buf());
    let path = resolve(path);
    if let Some(dir) = folder.filter(|_| !path.is_file()) {
        let last = dir.join("checkpoints").join("last.safetensors");
        if last.is_file() {
            bail!(
                "{}: the run has no best checkpoint (none written yet, or removed); give its last one, {}",
                dir.display(),
                last.display()
            );
        }
        bail!(
            "{}: no {} (is this a run folder of regimen train?)",
            dir.display(),
            path.display()
        );
    }
    let (tensors, meta) = regimen::io::read_safetensors(&path)?;
    let field = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            anyhow!(
                "{}: not a regimen train checkpoint (no '{k}' metadata)",
                path.display()
            )
        })
    };
    let shape = field("input_shape")?;
    // Every part a number: "1,x,28,28" is damage, not [1, 28, 28].
    let dims: Vec<usize> = shape
        .split(',')
        .map(|v| v.trim().parse().ok())
        .collect::<Option<_>>()
        .unwrap_or_default();
    let classes: usize = field("classes")?
        .parse()
        .map_err(|_| anyhow!("{}: bad classes metadata", path.display()))?;
    if dims.len() != 3 {
        bail!(
            "{}: bad input_shape metadata {shape:?} (expected C,H,W)",
            path.display()
        );
    }
    let name = field("model")?;
    let input = [dims[0], dims[1], dims[2]];
    let want = models::param_count(&name, input, classes)
        .with_context(|| format!("{}: the model metadata", path.display()))?;
    let have: usize = tensors
        .iter()
        .filter(|(n, _, _)| {
            !n.starts_with("preprocess.")
                && !n.starts_with("optim.")
                && !n.starts_with("grad.")
                && !n.contains("running_")
        })
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    if want != have {
        bail!(
            "{}: the metadata describes {name} for {input:?} inputs and {classes} classes ({want} parameters), but the file holds {have}",
            path.display()
        );
    }
    drop(tensors);
    let mut model = models::for_input(&name, input, classes, &mut Rng::new(0))?;
    let loaded = regimen::checkpoint::load(&path, &mut model)?;
    Ok(Described {
        member: Member {
            name: path.display().to_string(),
            model: Box::new(model),
            preprocess: loaded.preprocess,
        },
        dataset: field("dataset")?,
        data_dir: meta
            .get("config")
            .and_then(|c| c.parse::<toml::Table>().ok())
            .and_then(|t| {
                t.get("data_dir")
                    .and_then(|v| v.as_str().map(PathBuf::from))
            }),
        input,
        classes,
    })
}

/// `regimen eval`: each checkpoint's loss and accuracy on the test split, and with several,
/// the ensemble's (probabilities averaged).
pub fn eval(paths: &[PathBuf], dataset: Option<String>, data_dir: Option<PathBuf>) -> Result<()> {
    if paths.is_empty() {
        bail!("give one checkpoint, or several for an ensemble (a run folder means its best checkpoint)");
    }
    let mut described = Vec::new();
    for p in paths {
        described.push(load(p)?);
    }
    let dataset = match dataset {
        Some(d) => d,
        None => {
            let first = &described[0].dataset;
            if let Some(other) = described.iter().find(|d| &d.dataset != first) {
                bail!(
                    "{} was trained on {first}, {} on {}: give --dataset",
                    described[0].member.name,
                    other.member.name,
                    other.dataset
                );
            }
            first.clone()
        }
    };
    // Without --data-dir, the run's own data folder (when every checkpoint names the same
    // one and it is still there), so that a run trained on files elsewhere is evaluated on
    // them rather than on whatever the default search finds.
    let data_dir = data_dir.or_else(|| {
        let first = described[0].data_dir.clone()?;
        (described
            .iter()
            .all(|d| d.data_dir.as_ref() == Some(&first))
            && first.is_dir())
        .then(|| {
            say!("data: {} (the run's data_dir)", first.display());
            first
        })
    });
    let source = data_cmd::Source { dataset, data_dir };
    let raw = source.load()?.test;
    for d in &described {
        if raw.num_classes() != d.classes {
            bail!(
                "{} has {} classes, {} has {}",
                d.member.name,
                d.classes,
                source.dataset,
                raw.num_classes()
            );
        }
        let want = d
            .member
            .preprocess
            .as_ref()
            .map_or(d.input, |p| p.input_shape);
        if raw.image_shape != want {
            bail!(
                "{} takes {want:?} images, {} gives {:?}",
                d.member.name,
                source.dataset,
                raw.image_shape
            );
        }
    }
    let mut members: Vec<Member> = described.into_iter().map(|d| d.member).collect();
    let report = ensemble::evaluate(&mut members, &raw, regimen::Device::Cpu)?;
    for (name, loss, acc) in &report.members {
        say!(
            "{name} on the {} test split ({} images): loss {loss:.4}, accuracy {:.2}%",
            source.dataset,
            report.samples,
            100.0 * acc
        );
    }
    if report.members.len() > 1 {
        let best = report
            .members
            .iter()
            .map(|m| m.2)
            .fold(f32::NEG_INFINITY, f32::max);
        say!(
            "ensemble of {} (probabilities averaged): loss {:.4}, accuracy {:.2}% ({:+.2} points over the best member)",
            report.members.len(),
            report.loss,
            100.0 * report.accuracy,
            100.0 * (report.accuracy - best)
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// PNG images, or IDX image files (like t10k-images-idx3-ubyte[.gz]).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The checkpoint (repeat for an ensemble; a run folder means its best checkpoint).
    #[arg(long, required = true)]
    pub checkpoint: Vec<PathBuf>,
    /// csv or json.
    #[arg(long, default_value = "csv")]
    pub format: String,
}

/// Images of the model's input size `[C, H, W]` from PNG or IDX files: `(name, image)`.
fn read_inputs(paths: &[PathBuf], input: [usize; 3]) -> Result<Vec<(String, Vec<f32>)>> {
    let [c, h, w] = input;
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let name = p.display().to_string();
        if bytes.starts_with(b"\x89PNG") {
            let img = regimen::png::decode(&bytes, &name)?;
            if (img.height, img.width) != (h, w) {
                bail!(
                    "{name}: the image is {}x{}, the model takes {h}x{w}",
                    img.height,
                    img.width
                );
            }
            let plane = h * w;
            let pixels = match (img.channels, c) {
                (a, b) if a == b => img.pixels,
                // RGB to gray: ITU-R BT.601 luma.
                (3, 1) => (0..plane)
                    .map(|i| {
                        0.299 * img.pixels[i]
                            + 0.587 * img.pixels[plane + i]
                            + 0.114 * img.pixels[2 * plane + i]
                    })
                    .collect(),
                (1, 3) => img.pixels.repeat(3),
                (a, b) => bail!("{name}: {a} channels, the model takes {b}"),
            };
            out.push((name, pixels));
        } else {
            let idx = bytes.starts_with(&[0, 0, 8, 3]) || bytes.starts_with(&[0x1f, 0x8b]);
            if !idx {
                bail!(
                    "{name}: neither a PNG image nor an IDX image file (like t10k-images-idx3-ubyte[.gz]){}",
                    if bytes.is_empty() {
                        ": the file is empty".to_string()
                    } else {
                        format!(
                            ": it starts with bytes {}",
                            bytes
                                .iter()
                                .take(4)
                                .map(|b| format!("{b:02x}"))
                                .collect::<String>()
                        )
                    }
                );
            }
            let (pixels, n, ih, iw) = regimen::data::idx::read_images(p)?;
            if (ih, iw) != (h, w) || c != 1 {
                bail!("{name}: IDX images of {ih}x{iw}, the model takes {c}x{h}x{w}");
            }
            for (i, img) in pixels.chunks(h * w).take(n).enumerate() {
                out.push((
                    format!("{name}[{i}]"),
                    img.iter().map(|&v| v as f32 / 255.0).collect(),
                ));
            }
        }
    }
    Ok(out)
}

/// `regimen predict`: the class and the probabilities of every input image.
pub fn predict(args: &PredictArgs) -> Result<()> {
    if args.format != "csv" && args.format != "json" {
        bail!("invalid --format {:?}: expected csv or json", args.format);
    }
    let mut described = Vec::new();
    for p in &args.checkpoint {
        described.push(load(p)?);
    }
    if let Some(other) = described.iter().find(|d| d.dataset != described[0].dataset) {
        bail!(
            "{} was trained on {}, {} on {}: an ensemble's members must share one dataset (its classes)",
            described[0].member.name,
            described[0].dataset,
            other.member.name,
            other.dataset
        );
    }
    let (input, classes) = (described[0].input, described[0].classes);
    let raw_shape = described[0]
        .member
        .preprocess
        .as_ref()
        .map_or(input, |p| p.input_shape);
    for d in &described[1..] {
        let s = d
            .member
            .preprocess
            .as_ref()
            .map_or(d.input, |p| p.input_shape);
        if s != raw_shape || d.classes != classes {
            bail!(
                "{} and {} take different inputs or classes: an ensemble needs the same",
                described[0].member.name,
                d.member.name
            );
        }
    }
    let images = read_inputs(&args.inputs, raw_shape)?;
    let data = Dataset {
        images: images.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
        labels: vec![0; images.len()],
        image_shape: raw_shape,
        class_names: (0..classes).map(|c| c.to_string()).collect(),
    };
    let mut sum = vec![0f64; images.len() * classes];
    for d in &mut described {
        let mut x = data.clone();
        if let Some(p) = &d.member.preprocess {
            p.apply(&mut x)?;
        }
        let p = ensemble::probabilities(
            d.member.model.as_mut(),
            &x,
            256,
            regimen::Device::Cpu,
            &d.member.name,
        )?;
        sum.iter_mut().zip(&p).for_each(|(s, &v)| *s += v as f64);
    }
    let n = described.len() as f64;
    let names = class_names(&described[0].dataset, classes);
    let mut json = Vec::new();
    if args.format == "csv" {
        let probs: Vec<String> = (0..classes).map(|k| format!("p_{k}")).collect();
        say!("input,class,name,probability,{}", probs.join(","));
    }
    for (i, (name, _)) in images.iter().enumerate() {
        let row: Vec<f64> = sum[i * classes..(i + 1) * classes]
            .iter()
            .map(|s| s / n)
            .collect();
        let mut best = 0;
        for k in 1..classes {
            if row[k] > row[best] {
                best = k;
            }
        }
        if args.format == "csv" {
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            let ps: Vec<String> = row.iter().map(|p| format!("{p:.6}")).collect();
            say!(
                "{quoted},{best},{},{:.6},{}",
                names[best],
                row[best],
                ps.join(",")
            );
        } else {
            json.push(serde_json::json!({
                "input": name,
                "class": best,
                "name": names[best],
                "probability": row[best],
                "probabilities": row,
            }));
        }
    }
    if args.format == "json" {
        say!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

/// The class names of the datasets regimen knows (numbers otherwise).
fn class_names(dataset: &str, classes: usize) -> Vec<String> {
    let known: &[&str] = match dataset {
        "fashion-mnist" => &[
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
        ],
        "cifar10" => &[
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
        ],
        _ => &[],
    };
    (0..classes)
        .map(|k| known.get(k).map_or(k.to_string(), |s| s.to_string()))
        .collect()
}
