//! Losses and metrics on the CPU.

use rayon::prelude::*;

/// Rows of `[N, C]` logits: the loss summed over rows (f64, in row order whatever the thread
/// count) and `dlogits` written to `grad`, given a per-row target writer `target(row, out)`
/// that fills the row's target distribution.
pub fn softmax_cross_entropy(
    logits: &[f32],
    c: usize,
    smoothing: f32,
    grad_scale: f32,
    target: impl Fn(usize, &mut [f32]) + Sync,
    grad: &mut [f32],
) -> f64 {
    let n = logits.len() / c;
    let g = grad_scale / n as f32;
    let mut losses = vec![0.0f64; n];
    grad.par_chunks_mut(c)
        .zip(logits.par_chunks(c))
        .zip(losses.par_iter_mut())
        .enumerate()
        .for_each(|(row, ((g_r, x_r), loss))| {
            // g_r first holds the target distribution, then the gradient.
            target(row, g_r);
            if smoothing > 0.0 {
                let u = smoothing / c as f32;
                g_r.iter_mut().for_each(|t| *t = (1.0 - smoothing) * *t + u);
            }
            let mx = x_r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum_exp: f64 = x_r.iter().map(|&v| ((v - mx) as f64).exp()).sum();
            let lse = mx as f64 + sum_exp.ln();
            let t_sum: f64 = g_r.iter().map(|&t| t as f64).sum();
            let t_dot_x: f64 = g_r
                .iter()
                .zip(x_r)
                .map(|(&t, &v)| t as f64 * v as f64)
                .sum();
            for (gr, &v) in g_r.iter_mut().zip(x_r) {
                let p = ((v as f64) - lse).exp();
                *gr = ((p * t_sum) as f32 - *gr) * g;
            }
            *loss = lse * t_sum - t_dot_x;
        });
    losses.iter().sum()
}

/// Number of rows whose first arg-max equals the label.
pub fn count_correct(logits: &[f32], c: usize, labels: &[u32]) -> usize {
    logits
        .chunks(c)
        .zip(labels)
        .filter(|(row, &l)| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            best as u32 == l
        })
        .count()
}
