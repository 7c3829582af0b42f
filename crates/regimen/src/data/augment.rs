//! Data augmentation: random transforms of training images, composable into a pipeline.
//!
//! A pipeline is written like `crop=2,flip,cutmix=1.0` (a name alone takes the defaults). It
//! runs on preprocessed images, so "zeros" are 0 after preprocessing (the mean pixel under
//! `normalize`) and `noise`'s std is in those units:
//!
//! | name | parameter (default) | what it does to one image `[C, H, W]` |
//! |---|---|---|
//! | `crop` | padding (4) | pad with zeros, cut a random `H x W` window |
//! | `flip` | probability (0.5) | mirror left-right |
//! | `scale` | smallest area fraction (0.5) | random resized crop: one draw of an area in `[min, 1]` and an aspect ratio log-uniform in `[3/4, 4/3]`, each side clamped to the image (torchvision redraws up to 10 times instead, so here large boxes are a little more frequent), resized back (bilinear) |
//! | `rotate` | max degrees (15) | rotate about the centre by a uniform angle, bilinear, zeros outside |
//! | `translate` | max pixels (2) | shift by whole pixels in both axes, zeros outside |
//! | `noise` | std (0.1) | add Gaussian noise |
//! | `cutout` | box side (8) | zero a square whose centre is uniform over the image (clipped at the border; DeVries & Taylor 2017) |
//! | `mixup` | alpha (0.2) | batch: `x = l x_i + (1 - l) x_j`, `y = l y_i + (1 - l) y_j`, `l ~ Beta(alpha, alpha)` (Zhang et al. 2018) |
//! | `cutmix` | alpha (1.0) | batch: paste a box of `x_j` into `x_i`; the label weight is the pixel share (Yun et al. 2019) |
//!
//! CutMix follows the lecture's formulas: `l ~ Beta(alpha, alpha)`, box centre
//! `r_x ~ U(0, W)`, `r_y ~ U(0, H)`, size `r_w = W sqrt(1 - l)`, `r_h = H sqrt(1 - l)`, clipped
//! to the image; the label weight is then recomputed from the box's real area,
//! `l = 1 - (box area) / (W H)`, so it always equals the share of pixels from each image.
//! Mixup and CutMix draw one `l` and one pairing (a random permutation) per batch and produce
//! soft labels for the soft-label cross-entropy.
//!
//! Every draw comes from the [`Rng`] given to [`Pipeline::apply`]: the same seed gives the same
//! batch.
//!
//! Batches built on the device ([`Pipeline::device_plan`]) take a leading crop and flip in the
//! gather, then every other step on the whole batch: each sample of a per-image step draws from
//! a Philox stream of its own ([`device_sample_stream`]) through [`apply_one`], and Mixup and
//! CutMix pair sample `i` with sample `B - 1 - i` instead of drawing a permutation
//! ([`device_mix_draws`]).

use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    Crop { pad: usize },
    Flip { p: f32 },
    Scale { min_area: f32 },
    Rotate { degrees: f32 },
    Translate { pixels: usize },
    Noise { std: f32 },
    Cutout { size: usize },
    Mixup { alpha: f32 },
    CutMix { alpha: f32 },
}

/// The step as `--augment` writes it (`cutout=10`, `flip=0.5`).
impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Augment::Crop { pad } => write!(f, "crop={pad}"),
            Augment::Flip { p } => write!(f, "flip={p}"),
            Augment::Scale { min_area } => write!(f, "scale={min_area}"),
            Augment::Rotate { degrees } => write!(f, "rotate={degrees}"),
            Augment::Translate { pixels } => write!(f, "translate={pixels}"),
            Augment::Noise { std } => write!(f, "noise={std}"),
            Augment::Cutout { size } => write!(f, "cutout={size}"),
            Augment::Mixup { alpha } => write!(f, "mixup={alpha}"),
            Augment::CutMix { alpha } => write!(f, "cutmix={alpha}"),
        }
    }
}

impl Augment {
    /// True for the steps that mix samples (Mixup, CutMix) and so make soft labels.
    pub fn mixes(&self) -> bool {
        matches!(self, Augment::Mixup { .. } | Augment::CutMix { .. })
    }
}

/// A sequence of augmentations, applied in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline {
    pub steps: Vec<Augment>,
}

impl Pipeline {
    /// Parse `name[=value],...`; an empty string or `none` is the empty pipeline.
    pub fn parse(spec: &str) -> Result<Pipeline> {
        let mut steps = Vec::new();
        for item in spec
            .split(',')
            .map(str::trim)
            .filter(|s| *s != "none" && !spec.trim().is_empty())
        {
            if item.is_empty() {
                return Err(Error::config(
                    "augment",
                    spec,
                    "an empty item (two commas in a row, or a trailing comma?)",
                ));
            }
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item, None),
            };
            let field = format!("augment {name}");
            let num = |default: f32, lo: f32, hi: f32| -> Result<f32> {
                let v = match value {
                    None => default,
                    Some(v) => v
                        .parse()
                        .map_err(|_| Error::config(&field, v, "is not a number"))?,
                };
                if !(lo..=hi).contains(&v) {
                    return Err(Error::config(
                        &field,
                        v,
                        &format!("must be in [{lo}, {hi}]"),
                    ));
                }
                Ok(v)
            };
            let int = |default: usize, hi: usize| -> Result<usize> {
                let v = match value {
                    None => default,
                    Some(v) => v
                        .parse()
                        .map_err(|_| Error::config(&field, v, "is not a whole number"))?,
                };
                if v > hi {
                    return Err(Error::config(&field, v, &format!("must be at most {hi}")));
                }
                Ok(v)
            };
            steps.push(match name {
                "crop" => Augment::Crop { pad: int(4, 64)? },
                "flip" => Augment::Flip { p: num(0.5, 0.0, 1.0)? },
                "scale" => Augment::Scale { min_area: num(0.5, 0.01, 1.0)? },
                "rotate" => Augment::Rotate { degrees: num(15.0, 0.0, 180.0)? },
                "translate" => Augment::Translate { pixels: int(2, 64)? },
                "noise" => Augment::Noise { std: num(0.1, 0.0, 10.0)? },
                "cutout" => Augment::Cutout { size: int(8, 1024)? },
                // Below alpha = 0.01 the Beta sampler's `u^(1/alpha)` underflows too often.
                "mixup" => Augment::Mixup { alpha: num(0.2, 0.01, 100.0)? },
                "cutmix" => Augment::CutMix { alpha: num(1.0, 0.01, 100.0)? },
                other => {
                    return Err(Error::config(
                        "augment",
                        other,
                        "expected crop, flip, scale, rotate, translate, noise, cutout, mixup or cutmix (name or name=value, comma-separated)",
                    ))
                }
            });
        }
        Ok(Pipeline { steps })
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Refuse spatial transforms of images that have no space: after PCA or whitening an
    /// "image" is `[K, 1, 1]`, and a crop or a translation would zero it.
    pub fn check_image_shape(&self, shape: [usize; 3]) -> Result<()> {
        let spatial = self.steps.iter().find(|s| {
            matches!(
                s,
                Augment::Crop { .. }
                    | Augment::Flip { .. }
                    | Augment::Scale { .. }
                    | Augment::Rotate { .. }
                    | Augment::Translate { .. }
                    | Augment::Cutout { .. }
                    | Augment::CutMix { .. }
            )
        });
        if let Some(step) = spatial {
            if shape[1] < 2 || shape[2] < 2 {
                return Err(Error::config(
                    "augment",
                    step.to_string(),
                    &format!("is a spatial transform, but the inputs are {shape:?} (after PCA or whitening?): use noise or mixup, or no augmentation"),
                ));
            }
        }
        // Sizes in pixels must fit the image: beyond it they erase it, or shift it out.
        let side = shape[1].max(shape[2]);
        for step in &self.steps {
            let (what, size) = match *step {
                Augment::Crop { pad } => ("crop padding", pad),
                Augment::Translate { pixels } => ("translation", pixels),
                Augment::Cutout { size } => ("cutout size", size),
                _ => continue,
            };
            if size >= side {
                return Err(Error::config(
                    "augment",
                    step.to_string(),
                    &format!(
                        "the {what} ({size} pixels) must be smaller than the images ({}x{})",
                        shape[1], shape[2]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// How the pipeline runs on the device (batches gathered and augmented there): a crop and
    /// a flip at its head (at most one of each) go into the gather, every later step runs on
    /// the gathered batch, in order.
    pub fn device_plan(&self) -> DevicePlan {
        let mut plan = DevicePlan {
            pad: 0,
            flip_p: 0.0,
            after: Vec::new(),
        };
        let (mut crop, mut flip) = (false, false);
        for s in &self.steps {
            match *s {
                Augment::Crop { pad } if !crop && plan.after.is_empty() => {
                    (crop, plan.pad) = (true, pad)
                }
                Augment::Flip { p } if !flip && plan.after.is_empty() => {
                    (flip, plan.flip_p) = (true, p)
                }
                other => plan.after.push(other),
            }
        }
        plan
    }

    /// True when the pipeline mixes samples (Mixup, CutMix) and so makes soft labels.
    pub fn mixes(&self) -> bool {
        self.steps.iter().any(Augment::mixes)
    }

    /// Augment a batch `images` (`[B, C, H, W]`, row-major) in place. Returns the soft labels
    /// `[B, classes]` when a step mixes samples, else `None`.
    pub fn apply(
        &self,
        images: &mut [f32],
        shape: [usize; 3],
        labels: &[u32],
        classes: usize,
        rng: &mut Rng,
    ) -> Option<Vec<f32>> {
        let d: usize = shape.iter().product();
        let b = labels.len();
        let mut soft: Option<Vec<f32>> = None;
        for step in &self.steps {
            match *step {
                Augment::Mixup { alpha } | Augment::CutMix { alpha } => {
                    let y = soft.get_or_insert_with(|| one_hot(labels, classes));
                    let lam = rng.beta(alpha as f64, alpha as f64) as f32;
                    let mut perm: Vec<usize> = (0..b).collect();
                    rng.shuffle(&mut perm);
                    let original = images.to_vec();
                    let y0 = y.clone();
                    let lam = if let Augment::Mixup { .. } = step {
                        mixup(images, &original, &perm, d, lam);
                        lam
                    } else {
                        let bx = cutmix_box(shape[1], shape[2], lam, rng);
                        paste_box(images, &original, &perm, shape, bx);
                        bx.weight(shape[1], shape[2])
                    };
                    for i in 0..b {
                        for c in 0..classes {
                            y[i * classes + c] =
                                lam * y0[i * classes + c] + (1.0 - lam) * y0[perm[i] * classes + c];
                        }
                    }
                }
                one => {
                    for img in images.chunks_mut(d) {
                        apply_one(one, img, shape, rng);
                    }
                }
            }
        }
        soft
    }
}

/// A pipeline as the device runs it ([`Pipeline::device_plan`]): the gather's crop padding and
/// flip probability, then the batch steps that follow it (any augmentation).
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    pub pad: usize,
    pub flip_p: f32,
    /// The later steps, in order; the `k`-th draws under purpose
    /// [`AUGMENT_STEP`](crate::rng::purpose::AUGMENT_STEP)` + k`.
    pub after: Vec<Augment>,
}

impl DevicePlan {
    /// True when a step mixes samples (so the loss takes soft labels).
    pub fn mixes(&self) -> bool {
        self.after.iter().any(Augment::mixes)
    }
}

/// The draws of a Mixup or CutMix on the device, from a sequential Philox stream: `l ~
/// Beta(alpha, alpha)`, then for CutMix the box ([`cutmix_box`]). Returns the label weight of
/// each image's own label (`l`, or CutMix's pixel share) and the box. The device pairs sample
/// `i` with sample `B - 1 - i` (as timm does): the batch is already in random order, so no
/// permutation is drawn.
pub fn device_mix_draws(
    alpha: f32,
    cutmix: bool,
    h: usize,
    w: usize,
    rng: &mut Rng,
) -> (f32, Option<CutBox>) {
    let lam = rng.beta(alpha as f64, alpha as f64) as f32;
    if !cutmix {
        return (lam, None);
    }
    let bx = cutmix_box(h, w, lam, rng);
    (bx.weight(h, w), Some(bx))
}

/// The Philox stream of sample `i` of a batch step on the device: the step's per-sample
/// augmentations draw from `Rng::philox(device_sample_stream(stream, i), step, purpose)`, the
/// numbers [`apply_one`] reads, as the host pipeline draws them for one image.
pub fn device_sample_stream(stream: u64, i: usize) -> u64 {
    use crate::rng::mix64;
    mix64(stream ^ mix64(i as u64 + 1))
}

fn one_hot(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut y = vec![0.0; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        y[i * classes + l as usize] = 1.0;
    }
    y
}

/// One per-image augmentation of `img` (every kind but Mixup and CutMix), its numbers drawn from
/// `rng`: the host pipeline's step, and each sample's on the device.
pub fn apply_one(a: Augment, img: &mut [f32], shape: [usize; 3], rng: &mut Rng) {
    let [_, h, w] = shape;
    match a {
        Augment::Crop { pad } => {
            let dy = rng.below(2 * pad + 1) as isize - pad as isize;
            let dx = rng.below(2 * pad + 1) as isize - pad as isize;
            shift(img, shape, dy, dx);
        }
        Augment::Flip { p } => {
            if (rng.next_f64() as f32) < p {
                flip_horizontal(img, shape);
            }
        }
        Augment::Scale { min_area } => {
            let area = rng.uniform(min_area as f64, 1.0);
            let ratio = (rng.uniform((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln())).exp();
            let bw = ((area * ratio).sqrt() * w as f64).min(w as f64);
            let bh = ((area / ratio).sqrt() * h as f64).min(h as f64);
            let x0 = rng.uniform(0.0, w as f64 - bw);
            let y0 = rng.uniform(0.0, h as f64 - bh);
            resize_from(img, shape, (y0, x0, bh, bw));
        }
        Augment::Rotate { degrees } => {
            let angle = rng.uniform(-degrees as f64, degrees as f64).to_radians();
            rotate(img, shape, angle);
        }
        Augment::Translate { pixels } => {
            let dy = rng.below(2 * pixels + 1) as isize - pixels as isize;
            let dx = rng.below(2 * pixels + 1) as isize - pixels as isize;
            shift(img, shape, dy, dx);
        }
        Augment::Noise { std } => img.iter_mut().for_each(|v| *v += std * rng.normal() as f32),
        Augment::Cutout { size } => {
            let (cy, cx) = (rng.below(h), rng.below(w));
            cutout(img, shape, cy, cx, size);
        }
        Augment::Mixup { .. } | Augment::CutMix { .. } => {
            unreachable!("batch augmentations are applied by the pipeline")
        }
    }
}

/// Mirror each row.
pub fn flip_horizontal(img: &mut [f32], shape: [usize; 3]) {
    for row in img.chunks_mut(shape[2]) {
        row.reverse();
    }
}

/// `out[c, y, x] = in[c, y + dy, x + dx]`, zero outside: a crop of the zero-padded image at
/// offset `(dy, dx)` from the centred position (and a translation by `(-dy, -dx)`).
pub fn shift(img: &mut [f32], shape: [usize; 3], dy: isize, dx: isize) {
    let [c, h, w] = shape;
    let src = img.to_vec();
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        let out = &mut img[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let sy = y as isize + dy;
            let row = &mut out[y * w..(y + 1) * w];
            if sy < 0 || sy >= h as isize {
                row.fill(0.0);
                continue;
            }
            // Valid x: 0 <= x + dx < w.
            let lo = (-dx).clamp(0, w as isize) as usize;
            let hi = (w as isize - dx).clamp(0, w as isize) as usize;
            row[..lo].fill(0.0);
            row[hi.max(lo)..].fill(0.0);
            if lo < hi {
                let s = sy as usize * w;
                row[lo..hi].copy_from_slice(
                    &plane[s + (lo as isize + dx) as usize..s + (hi as isize + dx) as usize],
                );
            }
        }
    }
}

/// Zero the `size x size` square centred at `(cy, cx)`, clipped to the image. Returns the
/// clipped box `(y0, y1, x0, x1)`.
pub fn cutout(
    img: &mut [f32],
    shape: [usize; 3],
    cy: usize,
    cx: usize,
    size: usize,
) -> (usize, usize, usize, usize) {
    let [c, h, w] = shape;
    let half = size as isize / 2;
    let y0 = (cy as isize - half).clamp(0, h as isize) as usize;
    let y1 = (cy as isize - half + size as isize).clamp(0, h as isize) as usize;
    let x0 = (cx as isize - half).clamp(0, w as isize) as usize;
    let x1 = (cx as isize - half + size as isize).clamp(0, w as isize) as usize;
    for ch in 0..c {
        for y in y0..y1 {
            img[ch * h * w + y * w + x0..ch * h * w + y * w + x1].fill(0.0);
        }
    }
    (y0, y1, x0, x1)
}

fn bilinear(plane: &[f32], h: usize, w: usize, y: f64, x: f64) -> f32 {
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = ((y - y0) as f32, (x - x0) as f32);
    let at = |yy: f64, xx: f64| -> f32 {
        if yy < 0.0 || xx < 0.0 || yy >= h as f64 || xx >= w as f64 {
            0.0
        } else {
            plane[yy as usize * w + xx as usize]
        }
    };
    let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1.0) * fx;
    let bottom = at(y0 + 1.0, x0) * (1.0 - fx) + at(y0 + 1.0, x0 + 1.0) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Resize the box `(y0, x0, bh, bw)` (pixel units) to the whole image, bilinear.
fn resize_from(img: &mut [f32], shape: [usize; 3], (y0, x0, bh, bw): (f64, f64, f64, f64)) {
    let [c, h, w] = shape;
    let src = img.to_vec();
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                // Pixel centres map to pixel centres.
                let sy = y0 + (y as f64 + 0.5) * bh / h as f64 - 0.5;
                let sx = x0 + (x as f64 + 0.5) * bw / w as f64 - 0.5;
                // Clamp to the pixel centres: edge replication, never a zero from outside.
                let (sy, sx) = (sy.clamp(0.0, h as f64 - 1.0), sx.clamp(0.0, w as f64 - 1.0));
                img[ch * h * w + y * w + x] = bilinear(plane, h, w, sy, sx);
            }
        }
    }
}

/// Rotate by `angle` radians about the image centre (bilinear, zeros outside).
pub fn rotate(img: &mut [f32], shape: [usize; 3], angle: f64) {
    let [c, h, w] = shape;
    let src = img.to_vec();
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let (s, co) = angle.sin_cos();
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let (dy, dx) = (y as f64 - cy, x as f64 - cx);
                // Inverse rotation: where does this output pixel come from?
                let sy = cy + co * dy - s * dx;
                let sx = cx + s * dy + co * dx;
                img[ch * h * w + y * w + x] =
                    if sy < -0.5 || sx < -0.5 || sy > h as f64 - 0.5 || sx > w as f64 - 0.5 {
                        0.0
                    } else {
                        bilinear(plane, h, w, sy, sx)
                    };
            }
        }
    }
}

/// `x_i = lam x_i + (1 - lam) x_perm(i)`.
fn mixup(images: &mut [f32], original: &[f32], perm: &[usize], d: usize, lam: f32) {
    for (i, img) in images.chunks_mut(d).enumerate() {
        let other = &original[perm[i] * d..(perm[i] + 1) * d];
        img.iter_mut()
            .zip(other)
            .for_each(|(a, &b)| *a = lam * *a + (1.0 - lam) * b);
    }
}

/// A CutMix box, clipped: rows `y0..y1`, columns `x0..x1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutBox {
    pub y0: usize,
    pub y1: usize,
    pub x0: usize,
    pub x1: usize,
}

impl CutBox {
    /// The label weight of the image the box is pasted into: `1 - area / (H W)`.
    pub fn weight(&self, h: usize, w: usize) -> f32 {
        1.0 - ((self.y1 - self.y0) * (self.x1 - self.x0)) as f32 / (h * w) as f32
    }
}

/// The lecture's box: centre `r_x ~ U(0, W)`, `r_y ~ U(0, H)`, size `W sqrt(1 - lam)` by
/// `H sqrt(1 - lam)`, clipped.
pub fn cutmix_box(h: usize, w: usize, lam: f32, rng: &mut Rng) -> CutBox {
    let cut = (1.0 - lam as f64).max(0.0).sqrt();
    let (rw, rh) = (w as f64 * cut, h as f64 * cut);
    let (rx, ry) = (rng.uniform(0.0, w as f64), rng.uniform(0.0, h as f64));
    let clip = |v: f64, n: usize| v.round().clamp(0.0, n as f64) as usize;
    CutBox {
        y0: clip(ry - rh / 2.0, h),
        y1: clip(ry + rh / 2.0, h),
        x0: clip(rx - rw / 2.0, w),
        x1: clip(rx + rw / 2.0, w),
    }
}

/// Paste `bx` of `x_perm(i)` into each `x_i`.
pub fn paste_box(
    images: &mut [f32],
    original: &[f32],
    perm: &[usize],
    shape: [usize; 3],
    bx: CutBox,
) {
    let [c, h, w] = shape;
    let d = c * h * w;
    for (i, img) in images.chunks_mut(d).enumerate() {
        let other = &original[perm[i] * d..(perm[i] + 1) * d];
        for ch in 0..c {
            for y in bx.y0..bx.y1 {
                let o = ch * h * w + y * w;
                img[o + bx.x0..o + bx.x1].copy_from_slice(&other[o + bx.x0..o + bx.x1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every step prints as `--augment` writes it, and parses back to itself.
    #[test]
    fn steps_print_as_the_flag_writes_them() {
        let spec = "crop=3,flip=0.25,scale=0.6,rotate=12.5,translate=2,noise=0.05,cutout=4,mixup=0.4,cutmix=1";
        let p = Pipeline::parse(spec).unwrap();
        let text: Vec<String> = p.steps.iter().map(|s| s.to_string()).collect();
        assert_eq!(text.join(","), spec);
        assert_eq!(Pipeline::parse(&text.join(",")).unwrap(), p);
    }
}
