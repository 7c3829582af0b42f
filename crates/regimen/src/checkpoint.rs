//! Model checkpoints: every parameter and buffer under its PyTorch-style name
//! (`0.weight`, `1.running_mean`), in one safetensors file, written atomically (temp file +
//! rename), so a crash never leaves a half-written checkpoint. A fitted preprocessing is
//! stored in the same file (`preprocess.*` tensors and metadata), so that prediction applies
//! exactly the transform the model was trained with.
//!
//! The file loads in PyTorch with `safetensors.torch.load_file` + `model.load_state_dict` for
//! the same architecture, layer for layer (checked for the digits MLP with `strict=True`). Two
//! caveats: PyTorch's batch-norm `num_batches_tracked` counters are not stored (load with
//! `strict=False` or drop them), and regimen's `GlobalAvgPool` is one layer where PyTorch
//! writes `AdaptiveAvgPool2d(1)` + `Flatten()`, which shifts the indices after it.

use std::collections::BTreeMap;
use std::path::Path;

use crate::data::Preprocessor;
use crate::error::{Error, Result};
use crate::io::{read_safetensors, write_safetensors, NamedTensor};
use crate::layer::Layer;
use crate::tensor::Tensor;

/// Save `model`'s parameters and buffers, plus `preprocess` if given, and free-form `meta`.
pub fn save(
    path: &Path,
    model: &mut dyn Layer,
    preprocess: Option<&Preprocessor>,
    mut meta: BTreeMap<String, String>,
) -> Result<()> {
    let mut tensors: Vec<NamedTensor> = Vec::new();
    model.visit_params("", &mut |name, p| {
        tensors.push((name.to_string(), p.value.shape().to_vec(), p.value.to_vec()))
    });
    model.visit_buffers("", &mut |name, b| {
        tensors.push((name.to_string(), b.shape().to_vec(), b.to_vec()))
    });
    if let Some(p) = preprocess {
        let (t, m) = p.to_named();
        tensors.extend(t);
        meta.extend(m);
    }
    meta.insert("format".into(), "regimen-checkpoint-1".into());
    write_safetensors(path, &tensors, meta)
}

/// What [`load`] found besides the weights.
#[derive(Debug)]
pub struct Loaded {
    pub preprocess: Option<Preprocessor>,
    pub meta: BTreeMap<String, String>,
}

/// Load a checkpoint into `model`, which must have the same parameter and buffer names and
/// shapes; a missing, extra or misshapen tensor is an error naming it. Everything is checked
/// before anything changes: a failed load leaves the model as it was.
pub fn load(path: &Path, model: &mut dyn Layer) -> Result<Loaded> {
    let (tensors, meta) = read_safetensors(path)?;
    let file = path.display().to_string();
    let bad = |reason: String| Error::Data {
        file: file.clone(),
        reason,
    };
    // A run checkpoint ([`crate::trainer::Trainer::save_checkpoint`]) also holds the
    // optimizer's state (and, in the middle of an accumulated update, the gradients so far):
    // not part of the model.
    let mut by_name: BTreeMap<String, (Vec<usize>, Vec<f32>)> = tensors
        .into_iter()
        .filter(|(n, _, _)| !n.starts_with("optim.") && !n.starts_with("grad."))
        .map(|(n, s, v)| (n, (s, v)))
        .collect();
    // Pass 1: what the model holds, checked against the file.
    let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
    model.visit_params("", &mut |name, p| {
        wanted.push((name.to_string(), p.value.shape().to_vec()))
    });
    model.visit_buffers("", &mut |name, b| {
        wanted.push((name.to_string(), b.shape().to_vec()))
    });
    let mut values = Vec::with_capacity(wanted.len());
    for (name, shape) in &wanted {
        match by_name.remove(name) {
            None => {
                return Err(bad(format!(
                    "no tensor {name} (is this a checkpoint of another model?)"
                )))
            }
            Some((s, _)) if &s != shape => {
                return Err(bad(format!(
                    "{name} has shape {s:?}, the model expects {shape:?}"
                )))
            }
            Some((_, v)) => {
                use crate::run_state::{check_values, nonnegative_buffer};
                let diverged = "the checkpoint holds a diverged model";
                check_values(name, &v, diverged, nonnegative_buffer(name)).map_err(bad)?;
                values.push(v)
            }
        }
    }
    let preprocess = match meta.get("preprocess.kind") {
        None => None,
        Some(kind) => {
            let mut get = |n: &str| {
                by_name
                    .remove(&format!("preprocess.{n}"))
                    .map(|t| t.1)
                    .unwrap_or_default()
            };
            let dims: Vec<usize> = meta
                .get("preprocess.input_shape")
                .and_then(|s| s.split(',').map(|v| v.trim().parse().ok()).collect())
                .unwrap_or_default();
            if dims.len() != 3 {
                return Err(bad(format!(
                    "bad preprocess.input_shape metadata {:?} (expected C,H,W)",
                    meta.get("preprocess.input_shape")
                        .map_or("", String::as_str)
                )));
            }
            let p = Preprocessor {
                kind: crate::data::PreprocessKind::parse(kind)?,
                mean: get("mean"),
                std: get("std"),
                components: get("components"),
                eigenvalues: get("eigenvalues"),
                input_shape: [dims[0], dims[1], dims[2]],
            };
            p.check().map_err(|e| bad(e.to_string()))?;
            Some(p)
        }
    };
    if let Some(extra) = by_name.keys().next() {
        return Err(bad(format!(
            "tensor {extra} is not in the model (is this a checkpoint of another model?)"
        )));
    }
    // Pass 2: every check passed; now the model changes.
    let mut values = values.into_iter().zip(wanted);
    let mut put = |t: &mut Tensor| {
        let (v, (_, shape)) = values.next().expect("visited in the same order");
        *t = Tensor::from_host(&shape, v, t.device()).expect("the length was checked");
    };
    model.visit_params("", &mut |_, p| put(&mut p.value));
    model.visit_buffers("", &mut |_, b| put(b));
    Ok(Loaded { preprocess, meta })
}
