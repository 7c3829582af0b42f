//! Batch normalization and dropout on the CPU. Tensors are `[N, C, inner]`.

use rayon::prelude::*;

use crate::rng::fill_uniform;

pub struct NormDims {
    pub n: usize,
    pub c: usize,
    pub inner: usize,
}

impl NormDims {
    /// Values per channel.
    pub fn m(&self) -> usize {
        self.n * self.inner
    }
}

/// The forward's `z = x scale + shift` per channel (`scale = gamma invstd`,
/// `shift = beta - mean scale`), in its exact arithmetic: batch norm's output before a ReLU,
/// recomputed in backward to know where the ReLU passed.
pub struct Affine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

impl Affine {
    pub fn new(gamma: &[f32], beta: &[f32], mean: &[f32], invstd: &[f32]) -> Affine {
        let scale: Vec<f32> = gamma.iter().zip(invstd).map(|(&g, &i)| g * i).collect();
        let shift = (0..scale.len())
            .map(|c| beta[c] - mean[c] * scale[c])
            .collect();
        Affine { scale, shift }
    }
}

/// Per channel, `(sum dy, sum dy (x - mean[c]))` over the `N inner` values of that channel
/// (with `relu`, `dy` through the ReLU that followed: zero where `z <= 0`).
/// The blocks of `inner` values are read in memory order (streaming, in parallel), each summed
/// in eight f32 lanes over zipped slices (vectorized) into an f64 pair; the pairs are then added
/// per channel in sample order: the result does not depend on the number of threads.
fn dy_sums(
    x: &[f32],
    dy: &[f32],
    relu: Option<&Affine>,
    mean: &[f32],
    d: &NormDims,
) -> Vec<(f64, f64)> {
    let inner = d.inner.max(1);
    let blocks: Vec<(f64, f64)> = x
        .par_chunks(inner)
        .zip(dy.par_chunks(inner))
        .enumerate()
        .with_min_len((16384 / inner).max(1))
        .map_init(Vec::new, |owned: &mut Vec<f32>, (b, (xb, gb))| {
            let mu = mean[b % d.c];
            let gb: &[f32] = match relu {
                Some(a) => {
                    let (sc, sh) = (a.scale[b % d.c], a.shift[b % d.c]);
                    owned.clear();
                    owned.extend(xb.iter().zip(gb).map(|(&x, &g)| relu_grad(x * sc + sh, g)));
                    owned
                }
                None => gb,
            };
            let (mut la, mut lb) = ([0.0f32; 8], [0.0f32; 8]);
            let (xc, gc) = (xb.chunks_exact(8), gb.chunks_exact(8));
            let (xr, gr) = (xc.remainder(), gc.remainder());
            for (xs, gs) in xc.zip(gc) {
                for k in 0..8 {
                    la[k] += gs[k];
                    lb[k] += gs[k] * (xs[k] - mu);
                }
            }
            let mut acc = (0.0f64, 0.0f64);
            for (&xv, &g) in xr.iter().zip(gr) {
                acc.0 += g as f64;
                acc.1 += (g * (xv - mu)) as f64;
            }
            acc.0 += la.iter().map(|&v| v as f64).sum::<f64>();
            acc.1 += lb.iter().map(|&v| v as f64).sum::<f64>();
            acc
        })
        .collect();
    let mut out = vec![(0.0f64, 0.0f64); d.c];
    for (b, &(s0, s1)) in blocks.iter().enumerate() {
        let o = &mut out[b % d.c];
        o.0 += s0;
        o.1 += s1;
    }
    out
}

/// The gradient of a ReLU's input from its input or output `y` (`y > 0` exactly where its input
/// is, and a NaN output came from a NaN input): as the ReLU layer's backward, NaN propagating.
#[inline(always)]
pub fn relu_grad(y: f32, g: f32) -> f32 {
    if y > 0.0 {
        g
    } else if y.is_nan() {
        y
    } else {
        0.0
    }
}

/// Calls `f(channel, range, out_block)` for every contiguous block of `inner` values, in
/// parallel (blocks grouped so that each task has at least 16 K values), written once (no
/// zeroing pass: batch norm is memory-bound). `f` works on whole slices so that it vectorizes.
fn per_block(
    d: &NormDims,
    out: &mut [f32],
    f: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    debug_assert_eq!(out.len(), d.n * d.c * d.inner);
    let inner = d.inner.max(1);
    out.par_chunks_mut(inner)
        .with_min_len((16384 / inner).max(1))
        .enumerate()
        .for_each(|(b, blk)| f(b % d.c, b * inner..b * inner + blk.len(), blk));
}

/// Per channel, the mean and the biased variance in one pass over memory: each contiguous
/// block of `inner` values (in cache; the blocks read in memory order, in parallel) gets its own
/// mean and sum of squared deviations, and the blocks of each channel are merged in sample order
/// with Chan et al.'s parallel formula in f64 (no `E[x^2] - E[x]^2` cancellation).
fn channel_mean_var(x: &[f32], d: &NormDims) -> Vec<(f64, f64)> {
    let inner = d.inner.max(1);
    let blocks: Vec<(f64, f64, f64)> = x
        .par_chunks(inner)
        .with_min_len((16384 / inner).max(1))
        .map(|blk| {
            let nb = blk.len() as f64;
            let mut lanes = [0.0f32; 8];
            let mut chunks = blk.chunks_exact(8);
            for ch in &mut chunks {
                for k in 0..8 {
                    lanes[k] += ch[k];
                }
            }
            let sum = lanes.iter().map(|&v| v as f64).sum::<f64>()
                + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>();
            let mb = sum / nb;
            let mb32 = mb as f32;
            let mut sq = [0.0f32; 8];
            let mut chunks = blk.chunks_exact(8);
            for ch in &mut chunks {
                for k in 0..8 {
                    let t = ch[k] - mb32;
                    sq[k] += t * t;
                }
            }
            let m2b = sq.iter().map(|&v| v as f64).sum::<f64>()
                + chunks
                    .remainder()
                    .iter()
                    .map(|&v| ((v - mb32) as f64).powi(2))
                    .sum::<f64>();
            (nb, mb, m2b)
        })
        .collect();
    let mut acc = vec![(0.0f64, 0.0f64, 0.0f64); d.c];
    for (b, &(nb, mb, m2b)) in blocks.iter().enumerate() {
        let (n, mean, m2) = &mut acc[b % d.c];
        let total = *n + nb;
        let delta = mb - *mean;
        *mean += delta * nb / total;
        *m2 += m2b + delta * delta * *n * nb / total;
        *n = total;
    }
    acc.iter()
        .map(|&(n, mean, m2)| (mean, m2 / n.max(1.0)))
        .collect()
}

/// Writes `y` (followed by a ReLU with `relu`, in the same pass); returns
/// `(mean, invstd, var_biased)`.
pub fn forward_train(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: &NormDims,
    eps: f32,
    relu: bool,
    y: &mut [f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let stats = channel_mean_var(x, d);
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
    let invstd: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    // y = scale x + shift with scale = gamma invstd, shift = beta - mean scale.
    let a = Affine::new(gamma, beta, &mean, &invstd);
    per_block(d, y, |c, r, out| {
        let (sc, sh) = (a.scale[c], a.shift[c]);
        if relu {
            // The ReLU layer's rule: NaN propagates.
            for (o, &v) in out.iter_mut().zip(&x[r]) {
                let z = v * sc + sh;
                *o = if z <= 0.0 { 0.0 } else { z };
            }
        } else {
            for (o, &v) in out.iter_mut().zip(&x[r]) {
                *o = v * sc + sh;
            }
        }
    });
    (mean, invstd, var.iter().map(|&v| v as f32).collect())
}

pub fn forward_eval(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    d: &NormDims,
    y: &mut [f32],
) {
    per_block(d, y, |c, r, out| {
        let (g, mu, is, b) = (gamma[c], mean[c], invstd[c], beta[c]);
        for (o, &v) in out.iter_mut().zip(&x[r]) {
            *o = g * (v - mu) * is + b;
        }
    })
}

/// `dbeta += sum dy`, `dgamma += sum dy xhat`, and
/// `dx = gamma invstd (dy - [sum dy + xhat sum dy xhat] / M)` with batch statistics, or
/// `dx = gamma invstd dy` with fixed ones. With `relu_beta` (the forward's beta, when a ReLU
/// followed the batch norm in the same pass), `dy` is the gradient of the ReLU's output, turned
/// into the batch norm's output gradient on the fly: where the forward's `z` (recomputed from
/// `x`, bit for bit) was not above zero, it is zero.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    relu_beta: Option<&[f32]>,
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    d: &NormDims,
    batch_stats: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dx: &mut [f32],
) {
    let relu = relu_beta.map(|beta| Affine::new(gamma, beta, mean, invstd));
    // sum dy xhat = invstd sum dy (x - mean).
    let sums: Vec<(f64, f64)> = dy_sums(x, dy, relu.as_ref(), mean, d)
        .into_iter()
        .zip(invstd)
        .map(|((s_dy, s_dxm), &is)| (s_dy, s_dxm * is as f64))
        .collect();
    for (c, &(s_dy, s_dyx)) in sums.iter().enumerate() {
        dbeta[c] += s_dy as f32;
        dgamma[c] += s_dyx as f32;
    }
    if batch_stats {
        let inv_m = 1.0 / d.m() as f64;
        let mean_dy: Vec<f32> = sums.iter().map(|s| (s.0 * inv_m) as f32).collect();
        let mean_dyx: Vec<f32> = sums.iter().map(|s| (s.1 * inv_m) as f32).collect();
        per_block(d, dx, |c, r, out| {
            let (k, mu, is, mdy, mdyx) = (
                gamma[c] * invstd[c],
                mean[c],
                invstd[c],
                mean_dy[c],
                mean_dyx[c],
            );
            let xs = out.iter_mut().zip(&x[r.clone()]);
            match &relu {
                Some(a) => {
                    let (sc, sh) = (a.scale[c], a.shift[c]);
                    for ((o, &xv), &g) in xs.zip(&dy[r]) {
                        let xhat = (xv - mu) * is;
                        *o = k * (relu_grad(xv * sc + sh, g) - mdy - xhat * mdyx);
                    }
                }
                None => {
                    for ((o, &xv), &g) in xs.zip(&dy[r]) {
                        let xhat = (xv - mu) * is;
                        *o = k * (g - mdy - xhat * mdyx);
                    }
                }
            }
        })
    } else {
        per_block(d, dx, |c, r, out| {
            let k = gamma[c] * invstd[c];
            match &relu {
                Some(a) => {
                    let (sc, sh) = (a.scale[c], a.shift[c]);
                    for (o, (&xv, &g)) in out.iter_mut().zip(x[r.clone()].iter().zip(&dy[r])) {
                        *o = k * relu_grad(xv * sc + sh, g);
                    }
                }
                None => {
                    for (o, &g) in out.iter_mut().zip(&dy[r]) {
                        *o = k * g;
                    }
                }
            }
        })
    }
}

/// Inverted dropout: `mask[i] = (u_i >= p) / (1 - p)` with the Philox uniforms of
/// `(stream, step, purpose, i)`; `y = x * mask`.
#[allow(clippy::too_many_arguments)]
pub fn dropout(
    x: &[f32],
    p: f32,
    stream: u64,
    step: u32,
    purpose: u32,
    y: &mut [f32],
    mask: &mut [f32],
) {
    let keep = 1.0 / (1.0 - p);
    const CHUNK: usize = 1 << 13;
    mask.par_chunks_mut(CHUNK)
        .zip(y.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, ((m, y), x))| {
            fill_uniform(stream, step, purpose, (ci * CHUNK) as u64, m);
            for ((m, y), &x) in m.iter_mut().zip(y).zip(x) {
                *m = if *m >= p { keep } else { 0.0 };
                *y = x * *m;
            }
        });
}
