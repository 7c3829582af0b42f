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

/// Per channel, the two sums of `f(channel, i)` over the `N inner` values of that channel.
/// Each contiguous block of `inner` values is summed in eight f32 lanes (which the compiler
/// vectorizes), and the block sums in f64: a plain f64 running sum is a serial dependency
/// chain that made batch norm five times slower.
fn channel_sums<F>(d: &NormDims, f: F) -> Vec<(f64, f64)>
where
    F: Fn(usize, usize) -> (f32, f32) + Sync, // (channel, flat index) -> two terms
{
    (0..d.c)
        .into_par_iter()
        .map(|c| {
            let mut acc = (0.0f64, 0.0f64);
            for n in 0..d.n {
                let base = (n * d.c + c) * d.inner;
                let (end, mut i) = (base + d.inner, base);
                let (mut la, mut lb) = ([0.0f32; 8], [0.0f32; 8]);
                while i + 8 <= end {
                    for k in 0..8 {
                        let (x, y) = f(c, i + k);
                        la[k] += x;
                        lb[k] += y;
                    }
                    i += 8;
                }
                for j in i..end {
                    let (x, y) = f(c, j);
                    acc.0 += x as f64;
                    acc.1 += y as f64;
                }
                acc.0 += la.iter().map(|&v| v as f64).sum::<f64>();
                acc.1 += lb.iter().map(|&v| v as f64).sum::<f64>();
            }
            acc
        })
        .collect()
}

/// `out[i] = f(channel, i)` over every element, in parallel over `(n, c)` blocks, written
/// once (no zeroing pass: batch norm is memory-bound).
fn per_element(d: &NormDims, out: &mut [f32], f: impl Fn(usize, usize) -> f32 + Sync) {
    debug_assert_eq!(out.len(), d.n * d.c * d.inner);
    out.par_chunks_mut(d.inner.max(1))
        .enumerate()
        .for_each(|(b, blk)| {
            let c = b % d.c;
            let base = b * d.inner;
            for (j, o) in blk.iter_mut().enumerate() {
                *o = f(c, base + j);
            }
        });
}

/// Per channel, the mean and the biased variance in one pass over memory: each contiguous
/// block of `inner` values (in cache) gets its own mean and sum of squared deviations, and the
/// blocks are merged with Chan et al.'s parallel formula in f64 (no `E[x^2] - E[x]^2`
/// cancellation).
fn channel_mean_var(x: &[f32], d: &NormDims) -> Vec<(f64, f64)> {
    (0..d.c)
        .into_par_iter()
        .map(|c| {
            let (mut n, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
            for b in 0..d.n {
                let blk = &x[(b * d.c + c) * d.inner..(b * d.c + c + 1) * d.inner];
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
                let total = n + nb;
                let delta = mb - mean;
                mean += delta * nb / total;
                m2 += m2b + delta * delta * n * nb / total;
                n = total;
            }
            (mean, m2 / n.max(1.0))
        })
        .collect()
}

/// Writes `y`; returns `(mean, invstd, var_biased)`.
pub fn forward_train(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: &NormDims,
    eps: f32,
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
    let scale: Vec<f32> = (0..d.c).map(|c| gamma[c] * invstd[c]).collect();
    let shift: Vec<f32> = (0..d.c).map(|c| beta[c] - mean[c] * scale[c]).collect();
    per_element(d, y, |c, i| x[i] * scale[c] + shift[c]);
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
    per_element(d, y, |c, i| {
        gamma[c] * (x[i] - mean[c]) * invstd[c] + beta[c]
    })
}

/// `dbeta += sum dy`, `dgamma += sum dy xhat`, and
/// `dx = gamma invstd (dy - [sum dy + xhat sum dy xhat] / M)` with batch statistics, or
/// `dx = gamma invstd dy` with fixed ones.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    d: &NormDims,
    batch_stats: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dx: &mut [f32],
) {
    let sums = channel_sums(d, |c, i| {
        let xhat = (x[i] - mean[c]) * invstd[c];
        (dy[i], dy[i] * xhat)
    });
    for (c, &(s_dy, s_dyx)) in sums.iter().enumerate() {
        dbeta[c] += s_dy as f32;
        dgamma[c] += s_dyx as f32;
    }
    if batch_stats {
        let inv_m = 1.0 / d.m() as f64;
        let mean_dy: Vec<f32> = sums.iter().map(|s| (s.0 * inv_m) as f32).collect();
        let mean_dyx: Vec<f32> = sums.iter().map(|s| (s.1 * inv_m) as f32).collect();
        per_element(d, dx, |c, i| {
            let xhat = (x[i] - mean[c]) * invstd[c];
            gamma[c] * invstd[c] * (dy[i] - mean_dy[c] - xhat * mean_dyx[c])
        })
    } else {
        per_element(d, dx, |c, i| gamma[c] * invstd[c] * dy[i])
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
