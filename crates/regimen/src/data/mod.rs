//! Datasets in memory: images `[N, C, H, W]` as f32 with one class label each.

pub mod augment;
mod cifar;
mod digits;
pub mod download;
pub mod idx;
mod loader;
pub mod preprocess;
mod sources;

pub use augment::{Augment, Pipeline};
pub use cifar::read_batch as read_cifar_batch;
pub use digits::digits;
pub use loader::{batches_per_epoch, shuffled_order, Batch, Epoch, Loader};
pub use preprocess::{PreprocessKind, Preprocessor};
pub use sources::{load, search_dirs, Splits, CIFAR_CLASSES, DATASETS, DATA_ENV, FASHION_CLASSES};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{Device, Indices, Tensor};

/// A labelled image dataset held in host memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Row-major `[N, C, H, W]`.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// `[C, H, W]` of one image.
    pub image_shape: [usize; 3],
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.image_shape.iter().product()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// A 64-bit fingerprint of the data: the shape, every label and every pixel, each value
    /// mixed in whole (FNV-1a's step over 32-bit values, then splitmix64's finalizer). Other
    /// files, another subset, another order or one changed pixel give another fingerprint
    /// but for a negligible chance: it guards a resumed run against accidents, not against
    /// files crafted to collide. About 50 ms for Fashion-MNIST.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        self.image_shape.iter().for_each(|&d| eat(d as u64));
        eat(self.labels.len() as u64);
        self.labels.iter().for_each(|&l| eat(l as u64));
        self.images.iter().for_each(|p| eat(p.to_bits() as u64));
        // splitmix64's finalizer: every input bit reaches every output bit.
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    /// Check that images and labels agree: `N` labels for `N C H W` values, each below the
    /// number of classes.
    pub fn validate(&self) -> Result<()> {
        let want = self.labels.len() * self.image_len();
        if self.images.len() != want {
            return Err(Error::Data {
                file: "dataset".into(),
                reason: format!(
                    "{} values of images for {} labels of {:?} images (expected {want})",
                    self.images.len(),
                    self.labels.len(),
                    self.image_shape
                ),
            });
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.num_classes())
        {
            return Err(Error::Data {
                file: "dataset".into(),
                reason: format!(
                    "label {l} of sample {i} is not below the {} classes",
                    self.num_classes()
                ),
            });
        }
        Ok(())
    }

    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let d = self.image_len();
        let mut images = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            images.extend_from_slice(&self.images[i * d..(i + 1) * d]);
        }
        Dataset {
            images,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            image_shape: self.image_shape,
            class_names: self.class_names.clone(),
        }
    }

    /// A seeded random split: `(first, second)` with `fraction` of the samples in `second`.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::config(
                "split fraction",
                fraction,
                "must be in [0, 1)",
            ));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        Rng::new(seed).shuffle(&mut idx);
        let k = (self.len() as f64 * fraction).round() as usize;
        Ok((self.subset(&idx[k..]), self.subset(&idx[..k])))
    }

    /// Per-pixel affine map `x -> (x - mean) / std` with one mean and std for all pixels,
    /// as fitted by [`Dataset::pixel_mean_std`] on the training split.
    pub fn normalize(&mut self, mean: f32, std: f32) {
        let inv = 1.0 / std;
        self.images.iter_mut().for_each(|v| *v = (*v - mean) * inv);
    }

    /// Mean and standard deviation over every pixel.
    pub fn pixel_mean_std(&self) -> (f32, f32) {
        let n = self.images.len() as f64;
        let mean = self.images.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = self
            .images
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean as f32, var.sqrt() as f32)
    }

    /// The batch of samples `idx` on `device`: images `[B, C, H, W]` and labels.
    pub fn batch(&self, idx: &[usize], device: Device) -> Result<(Tensor, Indices)> {
        let d = self.image_len();
        let mut x = crate::backend::cpu::host_vec(idx.len() * d);
        for (dst, &i) in x.chunks_mut(d.max(1)).zip(idx) {
            dst.copy_from_slice(&self.images[i * d..(i + 1) * d]);
        }
        let [c, h, w] = self.image_shape;
        let x = Tensor::from_host(&[idx.len(), c, h, w], x, device)?;
        let y = Indices::from_vec(idx.iter().map(|&i| self.labels[i]).collect()).to_device(device);
        Ok((x, y))
    }
}
