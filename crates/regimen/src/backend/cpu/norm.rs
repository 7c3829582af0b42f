//! Batch normalization and dropout on the CPU. Tensors are `[N, C, inner]`.

use rayon::prelude::*;

use crate::rng::hash_uniform;

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

/// `out[i] = f(channel, i)` over every element, in parallel over `(n, c)` blocks.
fn per_element(d: &NormDims, out: &mut [f32], f: impl Fn(usize, usize) -> f32 + Sync) {
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

/// Returns `(y, mean, invstd, var_biased)`.
pub fn forward_train(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: &NormDims,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = d.m() as f64;
    let sums = channel_sums(d, |_, i| (x[i], 0.0));
    let mean: Vec<f64> = sums.iter().map(|s| s.0 / m).collect();
    let mean32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    // Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels.
    let var: Vec<f64> = channel_sums(d, |c, i| {
        let t = x[i] - mean32[c];
        (t * t, 0.0)
    })
    .iter()
    .map(|s| s.0 / m)
    .collect();
    let invstd: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    let mut y = vec![0.0f32; x.len()];
    per_element(d, &mut y, |c, i| {
        gamma[c] * (x[i] - mean[c]) * invstd[c] + beta[c]
    });
    (y, mean, invstd, var.iter().map(|&v| v as f32).collect())
}

pub fn forward_eval(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    d: &NormDims,
) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    per_element(d, &mut y, |c, i| {
        gamma[c] * (x[i] - mean[c]) * invstd[c] + beta[c]
    });
    y
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
) -> Vec<f32> {
    let sums = channel_sums(d, |c, i| {
        let xhat = (x[i] - mean[c]) * invstd[c];
        (dy[i], dy[i] * xhat)
    });
    for (c, &(s_dy, s_dyx)) in sums.iter().enumerate() {
        dbeta[c] += s_dy as f32;
        dgamma[c] += s_dyx as f32;
    }
    let mut dx = vec![0.0f32; x.len()];
    if batch_stats {
        let inv_m = 1.0 / d.m() as f64;
        let mean_dy: Vec<f32> = sums.iter().map(|s| (s.0 * inv_m) as f32).collect();
        let mean_dyx: Vec<f32> = sums.iter().map(|s| (s.1 * inv_m) as f32).collect();
        per_element(d, &mut dx, |c, i| {
            let xhat = (x[i] - mean[c]) * invstd[c];
            gamma[c] * invstd[c] * (dy[i] - mean_dy[c] - xhat * mean_dyx[c])
        });
    } else {
        per_element(d, &mut dx, |c, i| gamma[c] * invstd[c] * dy[i]);
    }
    dx
}

/// Inverted dropout; returns `(y, mask)`.
pub fn dropout(x: &[f32], p: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let keep = 1.0 / (1.0 - p);
    let mut mask = vec![0.0f32; x.len()];
    const CHUNK: usize = 1 << 13;
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, blk)| {
            let base = (ci * CHUNK) as u64;
            for (j, m) in blk.iter_mut().enumerate() {
                *m = if hash_uniform(seed, base + j as u64) >= p {
                    keep
                } else {
                    0.0
                };
            }
        });
    let y = super::elementwise::map2(x, &mask, |a, b| a * b);
    (y, mask)
}
