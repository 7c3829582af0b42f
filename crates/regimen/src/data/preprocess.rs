//! Preprocessing, fitted on the training split only and then applied unchanged to every split
//! (and saved with a model, so prediction sees the same transform).
//!
//! | kind | spec | transform of a sample `x` (D = C H W values) |
//! |---|---|---|
//! | none | `none` | `x` |
//! | zero-centering | `center` | `x - mean` (one mean over all pixels) |
//! | normalization | `normalize` | `(x - mean) / std` (one mean and std) |
//! | mean image (AlexNet) | `mean-image` | `x - mean_image` (a `[C, H, W]` mean) |
//! | per-channel mean (VGG) | `channel-mean` | `x_c - mean_c` |
//! | per-channel mean/std | `per-channel` | `(x_c - mean_c) / std_c` |
//! | PCA | `pca:K` | `U_K^T (x - mean_image)`: the K leading principal components |
//! | PCA whitening | `whiten:K` | `diag(1 / sqrt(lambda_K + eps)) U_K^T (x - mean_image)` |
//!
//! The lecture: zero-centering matters because a neuron whose inputs are all positive gets
//! gradients on its weights that all share one sign; for images, subtracting the mean image or
//! the per-channel mean is common and normalizing the variance less so. PCA and whitening turn
//! an image into a vector of K features (shape `[K, 1, 1]`).

use super::Dataset;
use crate::error::{Error, Result};
use crate::linalg::{gemm, MatRef};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PreprocessKind {
    None,
    Center,
    Normalize,
    MeanImage,
    ChannelMean,
    PerChannel,
    Pca(usize),
    Whiten(usize),
}

impl PreprocessKind {
    pub fn parse(spec: &str) -> Result<PreprocessKind> {
        let (name, arg) = spec.split_once(':').unwrap_or((spec, ""));
        let k = || -> Result<usize> {
            match arg.parse::<usize>() {
                Ok(k) if k > 0 => Ok(k),
                _ => Err(Error::config(
                    "preprocess",
                    spec,
                    "pca and whiten take the number of components, like pca:50",
                )),
            }
        };
        Ok(match name {
            "none" => PreprocessKind::None,
            "center" => PreprocessKind::Center,
            "normalize" => PreprocessKind::Normalize,
            "mean-image" => PreprocessKind::MeanImage,
            "channel-mean" => PreprocessKind::ChannelMean,
            "per-channel" => PreprocessKind::PerChannel,
            "pca" => PreprocessKind::Pca(k()?),
            "whiten" => PreprocessKind::Whiten(k()?),
            _ => return Err(Error::config("preprocess", spec, "expected none, center, normalize, mean-image, channel-mean, per-channel, pca:K or whiten:K")),
        })
    }

    pub fn spec(&self) -> String {
        match self {
            PreprocessKind::None => "none".into(),
            PreprocessKind::Center => "center".into(),
            PreprocessKind::Normalize => "normalize".into(),
            PreprocessKind::MeanImage => "mean-image".into(),
            PreprocessKind::ChannelMean => "channel-mean".into(),
            PreprocessKind::PerChannel => "per-channel".into(),
            PreprocessKind::Pca(k) => format!("pca:{k}"),
            PreprocessKind::Whiten(k) => format!("whiten:{k}"),
        }
    }
}

/// Whitening adds this to each eigenvalue before dividing by its square root.
pub const WHITEN_EPS: f32 = 1e-5;

/// A fitted preprocessing: the statistics of the training split.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    pub kind: PreprocessKind,
    /// One value, one per channel, or one per pixel (`[C, H, W]`), by kind.
    pub mean: Vec<f32>,
    /// One value or one per channel (1 where not used).
    pub std: Vec<f32>,
    /// PCA: `K x D` rows of principal directions, and their eigenvalues (variances).
    pub components: Vec<f32>,
    pub eigenvalues: Vec<f32>,
    /// `[C, H, W]` of the input it was fitted on.
    pub input_shape: [usize; 3],
}

fn mean_std(values: impl Iterator<Item = f32> + Clone) -> (f32, f32) {
    let (mut n, mut s) = (0usize, 0.0f64);
    for v in values.clone() {
        s += v as f64;
        n += 1;
    }
    let m = s / n.max(1) as f64;
    let var = values.map(|v| (v as f64 - m).powi(2)).sum::<f64>() / n.max(1) as f64;
    (m as f32, var.sqrt() as f32)
}

impl Preprocessor {
    /// Fit on `train` (never on a validation or test split).
    pub fn fit(kind: PreprocessKind, train: &Dataset) -> Result<Preprocessor> {
        if train.is_empty() {
            return Err(Error::config(
                "preprocess",
                kind.spec(),
                "needs a non-empty training set to fit on",
            ));
        }
        let [c, h, w] = train.image_shape;
        let (d, hw, n) = (c * h * w, h * w, train.len());
        let x = &train.images;
        let mut p = Preprocessor {
            kind,
            mean: vec![0.0],
            std: vec![1.0],
            components: Vec::new(),
            eigenvalues: Vec::new(),
            input_shape: train.image_shape,
        };
        let channel = |ch: usize| {
            x.chunks(d)
                .flat_map(move |img| img[ch * hw..(ch + 1) * hw].iter().copied())
        };
        let mean_image = || -> Vec<f32> {
            let mut m = vec![0.0f64; d];
            for img in x.chunks(d) {
                m.iter_mut().zip(img).for_each(|(a, &v)| *a += v as f64);
            }
            m.iter().map(|&v| (v / n as f64) as f32).collect()
        };
        match kind {
            PreprocessKind::None => {}
            PreprocessKind::Center | PreprocessKind::Normalize => {
                let (m, s) = mean_std(x.iter().copied());
                p.mean = vec![m];
                if kind == PreprocessKind::Normalize {
                    p.std = vec![s.max(1e-8)];
                }
            }
            PreprocessKind::MeanImage => p.mean = mean_image(),
            PreprocessKind::ChannelMean | PreprocessKind::PerChannel => {
                let stats: Vec<(f32, f32)> = (0..c).map(|ch| mean_std(channel(ch))).collect();
                p.mean = stats.iter().map(|s| s.0).collect();
                p.std = if kind == PreprocessKind::PerChannel {
                    stats.iter().map(|s| s.1.max(1e-8)).collect()
                } else {
                    vec![1.0; c]
                };
            }
            PreprocessKind::Pca(k) | PreprocessKind::Whiten(k) => {
                if k > d {
                    return Err(Error::config(
                        "preprocess",
                        kind.spec(),
                        &format!("at most {d} components for {c}x{h}x{w} images"),
                    ));
                }
                p.mean = mean_image();
                let (vecs, vals) = principal_components(x, &p.mean, n, d, k);
                p.components = vecs;
                p.eigenvalues = vals;
            }
        }
        Ok(p)
    }

    /// The image shape after the transform.
    pub fn output_shape(&self) -> [usize; 3] {
        match self.kind {
            PreprocessKind::Pca(k) | PreprocessKind::Whiten(k) => [k, 1, 1],
            _ => self.input_shape,
        }
    }

    /// Transform every sample of `data` in place.
    pub fn apply(&self, data: &mut Dataset) -> Result<()> {
        if data.image_shape != self.input_shape {
            return Err(Error::shape(
                format!("preprocess {}", self.kind.spec()),
                format!("{:?} (the image shape it was fitted on)", self.input_shape),
                &data.image_shape,
            ));
        }
        let [c, h, w] = self.input_shape;
        let (d, hw) = (c * h * w, h * w);
        match self.kind {
            PreprocessKind::None => {}
            PreprocessKind::Center | PreprocessKind::Normalize => {
                let (m, inv) = (self.mean[0], 1.0 / self.std[0]);
                data.images.iter_mut().for_each(|v| *v = (*v - m) * inv);
            }
            PreprocessKind::MeanImage => {
                for img in data.images.chunks_mut(d) {
                    img.iter_mut().zip(&self.mean).for_each(|(v, m)| *v -= m);
                }
            }
            PreprocessKind::ChannelMean | PreprocessKind::PerChannel => {
                for img in data.images.chunks_mut(d) {
                    for ch in 0..c {
                        let (m, inv) = (self.mean[ch], 1.0 / self.std[ch]);
                        img[ch * hw..(ch + 1) * hw]
                            .iter_mut()
                            .for_each(|v| *v = (*v - m) * inv);
                    }
                }
            }
            PreprocessKind::Pca(k) | PreprocessKind::Whiten(k) => {
                let n = data.len();
                let mut centered = data.images.clone();
                for img in centered.chunks_mut(d) {
                    img.iter_mut().zip(&self.mean).for_each(|(v, m)| *v -= m);
                }
                // [N, D] x [D, K] (components stored K x D).
                let mut z = vec![0.0f32; n * k];
                gemm(
                    MatRef::new(&centered, n, d),
                    MatRef::t(&self.components, d, k),
                    &mut z,
                    false,
                    gemm::Parallelism::None,
                );
                if let PreprocessKind::Whiten(_) = self.kind {
                    let scale: Vec<f32> = self
                        .eigenvalues
                        .iter()
                        .map(|&l| 1.0 / (l.max(0.0) + WHITEN_EPS).sqrt())
                        .collect();
                    for row in z.chunks_mut(k) {
                        row.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s);
                    }
                }
                data.images = z;
                data.image_shape = [k, 1, 1];
            }
        }
        Ok(())
    }
}

impl Preprocessor {
    /// The fitted statistics as `preprocess.*` tensors and metadata, the form checkpoints
    /// store them in.
    pub fn to_named(
        &self,
    ) -> (
        Vec<crate::io::NamedTensor>,
        std::collections::BTreeMap<String, String>,
    ) {
        let [c, h, w] = self.input_shape;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("preprocess.kind".to_string(), self.kind.spec());
        meta.insert("preprocess.input_shape".to_string(), format!("{c},{h},{w}"));
        let mut tensors = Vec::new();
        for (name, v) in [
            ("mean", &self.mean),
            ("std", &self.std),
            ("components", &self.components),
            ("eigenvalues", &self.eigenvalues),
        ] {
            if !v.is_empty() {
                tensors.push((format!("preprocess.{name}"), vec![v.len()], v.clone()));
            }
        }
        (tensors, meta)
    }

    /// Save the fitted statistics (safetensors, atomically), to ship with a model.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let t = |name: &str, v: &Vec<f32>| (name.to_string(), vec![v.len()], v.clone());
        let mut tensors = vec![t("mean", &self.mean), t("std", &self.std)];
        if !self.components.is_empty() {
            tensors.push(t("components", &self.components));
            tensors.push(t("eigenvalues", &self.eigenvalues));
        }
        let [c, h, w] = self.input_shape;
        let meta = std::collections::BTreeMap::from([
            ("kind".to_string(), self.kind.spec()),
            ("input_shape".to_string(), format!("{c},{h},{w}")),
        ]);
        crate::io::write_safetensors(path, &tensors, meta)
    }

    /// Check that the statistics have the lengths this kind needs for its input shape.
    pub fn check(&self) -> Result<()> {
        let (kind, dims) = (self.kind, self.input_shape);
        let p = self;
        let bad = |reason: String| Error::config("preprocess", kind.spec(), &reason);
        let d: usize = dims.iter().product();
        // The statistics' lengths each kind needs: (mean, std).
        let (m, sd) = match kind {
            PreprocessKind::None | PreprocessKind::Center | PreprocessKind::Normalize => (1, 1),
            PreprocessKind::MeanImage | PreprocessKind::Pca(_) | PreprocessKind::Whiten(_) => {
                (d, 1)
            }
            PreprocessKind::ChannelMean | PreprocessKind::PerChannel => (dims[0], dims[0]),
        };
        if p.mean.len() != m || p.std.len() != sd {
            return Err(bad(format!(
                "{} of {dims:?} images needs {m} means and {sd} stds, the file has {} and {}",
                kind.spec(),
                p.mean.len(),
                p.std.len()
            )));
        }
        if let PreprocessKind::Pca(k) | PreprocessKind::Whiten(k) = kind {
            if p.components.len() != k * d || p.eigenvalues.len() != k {
                return Err(bad(format!(
                    "{} needs {k} components of {d} values",
                    kind.spec()
                )));
            }
        }
        // The values: finite; a standard deviation positive, an eigenvalue (a variance) not
        // negative. A damaged value would turn every output into NaN.
        let value = |name: &str, v: &[f32], ok: fn(f32) -> bool, need: &str| -> Result<()> {
            match v.iter().position(|&x| !x.is_finite() || !ok(x)) {
                Some(i) => Err(bad(format!("preprocess.{name}[{i}] is {}: {need}", v[i]))),
                None => Ok(()),
            }
        };
        value("mean", &p.mean, |_| true, "a mean must be finite")?;
        value(
            "std",
            &p.std,
            |x| x > 0.0,
            "a standard deviation must be positive and finite",
        )?;
        value(
            "components",
            &p.components,
            |_| true,
            "a component must be finite",
        )?;
        // An eigenvalue may be a rounding below zero (constant pixels); `apply` clamps it.
        value(
            "eigenvalues",
            &p.eigenvalues,
            |_| true,
            "an eigenvalue must be finite",
        )?;
        Ok(())
    }

    /// Load what [`Preprocessor::save`] wrote.
    pub fn load(path: &std::path::Path) -> Result<Preprocessor> {
        let (tensors, meta) = crate::io::read_safetensors(path)?;
        let bad = |reason: String| Error::Data {
            file: path.display().to_string(),
            reason,
        };
        let kind = PreprocessKind::parse(
            meta.get("kind")
                .ok_or_else(|| bad("no 'kind' metadata: not a preprocessing file".into()))?,
        )?;
        let dims: Vec<usize> = meta
            .get("input_shape")
            .and_then(|s| s.split(',').map(|v| v.trim().parse().ok()).collect())
            .unwrap_or_default();
        if dims.len() != 3 {
            return Err(bad("missing or bad 'input_shape' metadata".into()));
        }
        let get = |name: &str| tensors.iter().find(|t| t.0 == name).map(|t| t.2.clone());
        let p = Preprocessor {
            kind,
            mean: get("mean").ok_or_else(|| bad("no 'mean' tensor".into()))?,
            std: get("std").ok_or_else(|| bad("no 'std' tensor".into()))?,
            components: get("components").unwrap_or_default(),
            eigenvalues: get("eigenvalues").unwrap_or_default(),
            input_shape: [dims[0], dims[1], dims[2]],
        };
        p.check().map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }
}

/// The `k` leading eigenvectors (as `k x d` rows) and eigenvalues of the covariance of the
/// centered data, by subspace iteration with Rayleigh–Ritz refinement.
fn principal_components(
    x: &[f32],
    mean: &[f32],
    n: usize,
    d: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut centered = x.to_vec();
    for img in centered.chunks_mut(d) {
        img.iter_mut().zip(mean).for_each(|(v, m)| *v -= m);
    }
    // Covariance C = X^T X / n  (d x d).
    let mut cov = vec![0.0f32; d * d];
    gemm(
        MatRef::t(&centered, d, n),
        MatRef::new(&centered, n, d),
        &mut cov,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    );
    cov.iter_mut().for_each(|v| *v /= n as f32);
    // Subspace iteration on p = min(d, k + 8) vectors (oversampling speeds convergence).
    let p = d.min(k + 8);
    let mut rng = Rng::new(0x9CA);
    let mut q: Vec<f32> = (0..d * p).map(|_| rng.normal() as f32).collect(); // d x p
    orthonormalize_columns(&mut q, d, p);
    let mut z = vec![0.0f32; d * p];
    // z = C q
    let times_cov = |q: &[f32], z: &mut [f32]| {
        gemm(
            MatRef::new(&cov, d, d),
            MatRef::new(q, d, p),
            z,
            false,
            gemm::Parallelism::None,
        )
    };
    // Rayleigh–Ritz: T = Q^T C Q (p x p), eigen-decomposed (Jacobi, exact for small p).
    let ritz = |q: &[f32], z: &mut [f32]| {
        times_cov(q, z);
        let mut t = vec![0.0f64; p * p];
        for i in 0..p {
            for j in 0..p {
                t[i * p + j] = (0..d)
                    .map(|r| q[r * p + i] as f64 * z[r * p + j] as f64)
                    .sum();
            }
        }
        jacobi_eigen(&mut t, p)
    };
    let top = |vals: &[f64]| {
        let mut v = vals.to_vec();
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        v.truncate(k);
        v
    };
    // Iterate until the top k Ritz values settle (relative change below 1e-7, checked every 5
    // iterations): the number of iterations follows the spectrum's gaps instead of a fixed
    // count. The cap only guards against a degenerate spectrum, where any basis of the
    // eigenspace is as good.
    let mut last: Option<Vec<f64>> = None;
    for it in 1..=1000 {
        times_cov(&q, &mut z);
        std::mem::swap(&mut q, &mut z);
        orthonormalize_columns(&mut q, d, p);
        if it % 5 == 0 {
            let now = top(&ritz(&q, &mut z).0);
            let settled = last.as_ref().is_some_and(|prev| {
                prev.iter()
                    .zip(&now)
                    .all(|(a, b)| (a - b).abs() <= 1e-7 * b.abs().max(now[0].abs() * 1e-6))
            });
            if settled {
                break;
            }
            last = Some(now);
        }
    }
    let (vals, vecs) = ritz(&q, &mut z);
    let mut order: Vec<usize> = (0..p).collect();
    order.sort_by(|&a, &b| vals[b].partial_cmp(&vals[a]).unwrap());
    let mut comps = vec![0.0f32; k * d];
    for (out, &e) in order.iter().take(k).enumerate() {
        for r in 0..d {
            comps[out * d + r] = (0..p)
                .map(|j| q[r * p + j] as f64 * vecs[j * p + e])
                .sum::<f64>() as f32;
        }
    }
    (
        comps,
        order.iter().take(k).map(|&e| vals[e] as f32).collect(),
    )
}

/// Modified Gram–Schmidt on the columns of a row-major `rows x cols` matrix, each column
/// orthogonalized twice ("twice is enough", Kahan): when the data has fewer dimensions than
/// the subspace, some columns of `C Q` are rounding noise, and one pass would leave them far
/// from orthogonal to the others.
fn orthonormalize_columns(m: &mut [f32], rows: usize, cols: usize) {
    for j in 0..cols {
        for _pass in 0..2 {
            for i in 0..j {
                let dot: f64 = (0..rows)
                    .map(|r| m[r * cols + i] as f64 * m[r * cols + j] as f64)
                    .sum();
                for r in 0..rows {
                    m[r * cols + j] -= (dot as f32) * m[r * cols + i];
                }
            }
        }
        let norm = (0..rows)
            .map(|r| (m[r * cols + j] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-30);
        for r in 0..rows {
            m[r * cols + j] = (m[r * cols + j] as f64 / norm) as f32;
        }
    }
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix) of a symmetric
/// `n x n` matrix by cyclic Jacobi rotations.
fn jacobi_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_a_damaged_value() {
        let ok = Preprocessor {
            kind: PreprocessKind::Whiten(1),
            mean: vec![0.5; 4],
            std: vec![1.0],
            components: vec![0.5; 4],
            eigenvalues: vec![2.0],
            input_shape: [1, 2, 2],
        };
        ok.check().unwrap();
        let bad = |f: fn(&mut Preprocessor)| {
            let mut p = ok.clone();
            f(&mut p);
            p.check().unwrap_err().to_string()
        };
        let e = bad(|p| p.std[0] = 0.0);
        assert!(
            e.contains("preprocess.std[0] is 0: a standard deviation must be positive"),
            "{e}"
        );
        let e = bad(|p| p.std[0] = f32::NAN);
        assert!(e.contains("preprocess.std[0] is NaN"), "{e}");
        let e = bad(|p| p.mean[2] = f32::INFINITY);
        assert!(
            e.contains("preprocess.mean[2] is inf: a mean must be finite"),
            "{e}"
        );
        let e = bad(|p| p.components[3] = f32::NAN);
        assert!(e.contains("preprocess.components[3] is NaN"), "{e}");
        let e = bad(|p| p.eigenvalues[0] = f32::INFINITY);
        assert!(
            e.contains("preprocess.eigenvalues[0] is inf: an eigenvalue must be finite"),
            "{e}"
        );
        // A rounding below zero (constant pixels) is legal: `apply` clamps it.
        let mut tiny = ok.clone();
        tiny.eigenvalues[0] = -1e-17;
        tiny.check().unwrap();
        let e = bad(|p| p.mean.push(0.0));
        assert!(
            e.contains("needs 4 means and 1 stds, the file has 5 and 1"),
            "{e}"
        );
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn jacobi_and_subspace_iteration_find_known_eigenvalues() {
        let mut a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let (vals, _) = jacobi_eigen(&mut a, 3);
        let mut v = vals.clone();
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        // numpy.linalg.eigvalsh([[4,1,.5],[1,3,.2],[.5,.2,1]])
        for (g, w) in v.iter().zip([
            4.694_282_549_261_636,
            2.387_646_931_466_557,
            0.918_070_519_271_805_7,
        ]) {
            assert!((g - w).abs() < 1e-9, "{v:?}");
        }
        let x: Vec<f32> = (0..120)
            .map(|i| ((0.37 * i as f64).sin() + 0.1 * (i % 7) as f64) as f32)
            .collect();
        let mut mean = vec![0.0f32; 12];
        for img in x.chunks(12) {
            mean.iter_mut().zip(img).for_each(|(m, v)| *m += v / 10.0);
        }
        // Rank 9 data (10 centered samples) in 12 dimensions, 11 subspace vectors.
        let (_, vals) = principal_components(&x, &mean, 10, 12, 3);
        for (g, w) in vals.iter().zip([
            3.499_804_012_398_978f32,
            2.767_804_053_196_416,
            0.055_767_031_792_277_92,
        ]) {
            assert!((g - w).abs() < 1e-4, "{vals:?}");
        }
    }
}
