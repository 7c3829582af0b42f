//! Pooling kernels: max, average, global average, fractional max, maxout groups.
//! All run in parallel over planes (one `(n, c)` pair, or one row for maxout).

use rayon::prelude::*;

use crate::backend::Window;

pub struct PoolDims {
    #[allow(dead_code)] // the planes follow from the slices; kept for the shape in one place
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Max over the window of each output; returns values and in-plane arg-max positions.
/// Padding acts as -inf; a window that lies fully in the padding yields -inf (cannot happen
/// with PyTorch's constraint pad <= k / 2).
pub fn max_forward(x: &[f32], d: &PoolDims, win: Window, y: &mut [f32], idx: &mut [u32]) {
    if win
        == (Window {
            kh: 2,
            kw: 2,
            stride: 2,
            pad: 0,
        })
    {
        return max_forward_2x2(x, d, y, idx);
    }
    regions_max(
        x,
        d,
        |oy| clipped(oy, win.kh, win, d.h),
        |ox| clipped(ox, win.kw, win, d.w),
        y,
        idx,
    )
}

/// The common 2x2, stride-2 case without the general window bookkeeping (same results,
/// including the first-maximum tie rule and NaN propagation). The per-plane loop is compiled
/// three times (AVX-512, AVX2, baseline) and chosen at run time: with wide vectors the
/// compiler turns its column pairs into de-interleaving shuffles and blends.
fn max_forward_2x2(x: &[f32], d: &PoolDims, y: &mut [f32], idx: &mut [u32]) {
    let (hw, ohw) = (d.h * d.w, d.oh * d.ow);
    let plane = plane_2x2_dispatch();
    y.par_chunks_mut(ohw)
        .zip(idx.par_chunks_mut(ohw))
        .zip(x.par_chunks(hw))
        .with_min_len(16)
        .for_each(|((y_p, i_p), x_p)| plane(x_p, d.w, d.oh, d.ow, y_p, i_p));
}

type Plane2x2 = fn(&[f32], usize, usize, usize, &mut [f32], &mut [u32]);

fn plane_2x2_dispatch() -> Plane2x2 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::direct::isa() == Some(super::direct::Isa::Avx512)
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            return |x, w, oh, ow, y, i| unsafe { plane_2x2_avx512(x, w, oh, ow, y, i) };
        }
        if super::direct::isa().is_some() {
            return |x, w, oh, ow, y, i| unsafe { plane_2x2_avx2(x, w, oh, ow, y, i) };
        }
    }
    plane_2x2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn plane_2x2_avx512(
    x: &[f32],
    w: usize,
    oh: usize,
    ow: usize,
    y: &mut [f32],
    i: &mut [u32],
) {
    plane_2x2(x, w, oh, ow, y, i)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn plane_2x2_avx2(x: &[f32], w: usize, oh: usize, ow: usize, y: &mut [f32], i: &mut [u32]) {
    plane_2x2(x, w, oh, ow, y, i)
}

/// One plane of the 2x2 max pool.
#[inline(always)]
fn plane_2x2(x_p: &[f32], w: usize, oh: usize, ow: usize, y_p: &mut [f32], i_p: &mut [u32]) {
    for oy in 0..oh {
        let (t0, t1) = (2 * oy * w, (2 * oy + 1) * w);
        let (r0, r1) = (&x_p[t0..t0 + w], &x_p[t1..t1 + w]);
        let (yo, io) = (
            &mut y_p[oy * ow..(oy + 1) * ow],
            &mut i_p[oy * ow..(oy + 1) * ow],
        );
        // Pairs of columns as chunks (no index arithmetic, so that the loop
        // vectorizes). Row-major order of the window, first maximum wins, NaN
        // propagates: `!(v <= best)` is `v > best || v is NaN` in one comparison, and
        // a NaN already taken stays (`best == best` is false for NaN). The selects
        // compile to conditional moves or blends (branches mispredicted half the time).
        let pairs = r0.chunks_exact(2).zip(r1.chunks_exact(2));
        for (ox, ((a, b), (yv, iv))) in pairs.zip(yo.iter_mut().zip(io.iter_mut())).enumerate() {
            let c = (2 * ox) as u32;
            let (mut best, mut at) = (a[0], t0 as u32 + c);
            for (v, i) in [
                (a[1], t0 as u32 + c + 1),
                (b[0], t1 as u32 + c),
                (b[1], t1 as u32 + c + 1),
            ] {
                let take = takes(best, v);
                best = if take { v } else { best };
                at = if take { i } else { at };
            }
            *yv = best;
            *iv = at;
        }
    }
}

/// The max pool's rule for the next value `v` of a window against the best so far: taken when
/// above it or NaN (`!(v <= best)` in one comparison), and a NaN already taken stays
/// (`best == best` is false for NaN). Straight-line, so that loops over windows vectorize.
#[inline(always)]
pub(super) fn takes(best: f32, v: f32) -> bool {
    #[allow(clippy::eq_op)]
    let kept_nan = best == best;
    !(v <= best) & kept_nan
}

/// Max pooling over arbitrary rectangular regions given per plane by `rows(oy)`, `cols(ox)`.
fn regions_max<R, C>(x: &[f32], d: &PoolDims, rows: R, cols: C, y: &mut [f32], idx: &mut [u32])
where
    R: Fn(usize) -> (usize, usize) + Sync,
    C: Fn(usize) -> (usize, usize) + Sync,
{
    let (hw, ohw) = (d.h * d.w, d.oh * d.ow);
    y.par_chunks_mut(ohw)
        .zip(idx.par_chunks_mut(ohw))
        .zip(x.par_chunks(hw))
        .for_each(|((y_p, i_p), x_p)| {
            for oy in 0..d.oh {
                let (r0, r1) = rows(oy);
                for ox in 0..d.ow {
                    let (c0, c1) = cols(ox);
                    let (mut best, mut at) = (f32::NEG_INFINITY, (r0 * d.w + c0) as u32);
                    for iy in r0..r1 {
                        for ix in c0..c1 {
                            let v = x_p[iy * d.w + ix];
                            if !best.is_nan() && (v > best || v.is_nan()) {
                                best = v;
                                at = (iy * d.w + ix) as u32;
                            }
                        }
                    }
                    y_p[oy * d.ow + ox] = best;
                    i_p[oy * d.ow + ox] = at;
                }
            }
        });
}

/// `dx[plane, idx[j]] += dy[plane, j]`.
pub fn max_backward(
    dy: &[f32],
    idx: &[u32],
    planes: usize,
    dy_plane: usize,
    x_plane: usize,
    dx: &mut [f32],
) {
    debug_assert_eq!(dx.len(), planes * x_plane);
    // Each plane is zeroed by the thread that scatters into it (one pass while it is in cache,
    // in parallel, rather than a serial fill of the whole tensor first).
    dx.par_chunks_mut(x_plane)
        .zip(dy.par_chunks(dy_plane).zip(idx.par_chunks(dy_plane)))
        .for_each(|(dx_p, (dy_p, i_p))| {
            dx_p.fill(0.0);
            for (&g, &i) in dy_p.iter().zip(i_p) {
                dx_p[i as usize] += g;
            }
        });
}

/// The window of output `o` along an axis of length `n`: `[start, end)` clipped to the input.
fn clipped(o: usize, win_k: usize, win: Window, n: usize) -> (usize, usize) {
    let start = (o * win.stride) as isize - win.pad as isize;
    (
        start.max(0) as usize,
        ((start + win_k as isize).min(n as isize)).max(0) as usize,
    )
}

pub fn avg_forward(x: &[f32], d: &PoolDims, win: Window, y: &mut [f32]) {
    let (hw, ohw) = (d.h * d.w, d.oh * d.ow);
    let inv = 1.0 / (win.kh * win.kw) as f32;
    y.par_chunks_mut(ohw)
        .zip(x.par_chunks(hw))
        .for_each(|(y_p, x_p)| {
            for oy in 0..d.oh {
                let (r0, r1) = clipped(oy, win.kh, win, d.h);
                for ox in 0..d.ow {
                    let (c0, c1) = clipped(ox, win.kw, win, d.w);
                    let mut s = 0.0;
                    for iy in r0..r1 {
                        s += x_p[iy * d.w + c0..iy * d.w + c1].iter().sum::<f32>();
                    }
                    y_p[oy * d.ow + ox] = s * inv;
                }
            }
        });
}

pub fn avg_backward(dy: &[f32], d: &PoolDims, win: Window, dx: &mut [f32]) {
    let (hw, ohw) = (d.h * d.w, d.oh * d.ow);
    let inv = 1.0 / (win.kh * win.kw) as f32;
    dx.par_chunks_mut(hw)
        .zip(dy.par_chunks(ohw))
        .for_each(|(dx_p, dy_p)| {
            dx_p.fill(0.0);
            for oy in 0..d.oh {
                let (r0, r1) = clipped(oy, win.kh, win, d.h);
                for ox in 0..d.ow {
                    let (c0, c1) = clipped(ox, win.kw, win, d.w);
                    let g = dy_p[oy * d.ow + ox] * inv;
                    for iy in r0..r1 {
                        dx_p[iy * d.w + c0..iy * d.w + c1]
                            .iter_mut()
                            .for_each(|v| *v += g);
                    }
                }
            }
        });
}

/// PyTorch's interval rule for fractional max pooling (`generate_intervals` in
/// `FractionalMaxPool2d.cpp`): window starts `floor((i + u) alpha) - floor(u alpha)` with
/// `alpha = (n - k) / (out - 1)`, and the last window flush with the end.
pub fn fractional_starts(u: f32, n: usize, out: usize, k: usize) -> Vec<usize> {
    let mut seq = vec![0usize; out];
    if out > 1 {
        let alpha = (n - k) as f32 / (out - 1) as f32;
        for (i, s) in seq.iter_mut().enumerate().take(out - 1) {
            *s = (((i as f32 + u) * alpha) as i64 - (u * alpha) as i64) as usize;
        }
    }
    if out > 0 {
        seq[out - 1] = n - k;
    }
    seq
}

pub fn fractional_forward(
    x: &[f32],
    d: &PoolDims,
    kernel: (usize, usize),
    samples: &[f32],
    y: &mut [f32],
    idx: &mut [u32],
) {
    let (hw, ohw) = (d.h * d.w, d.oh * d.ow);
    let (kh, kw) = kernel;
    y.par_chunks_mut(ohw)
        .zip(idx.par_chunks_mut(ohw))
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(p, ((y_p, i_p), x_p))| {
            let sw = fractional_starts(samples[2 * p], d.w, d.ow, kw);
            let sh = fractional_starts(samples[2 * p + 1], d.h, d.oh, kh);
            for (oy, &r0) in sh.iter().enumerate() {
                for (ox, &c0) in sw.iter().enumerate() {
                    let (mut best, mut at) = (f32::NEG_INFINITY, (r0 * d.w + c0) as u32);
                    for iy in r0..r0 + kh {
                        for ix in c0..c0 + kw {
                            let v = x_p[iy * d.w + ix];
                            if !best.is_nan() && (v > best || v.is_nan()) {
                                best = v;
                                at = (iy * d.w + ix) as u32;
                            }
                        }
                    }
                    y_p[oy * d.ow + ox] = best;
                    i_p[oy * d.ow + ox] = at;
                }
            }
        });
}

/// Maxout: `x` rows of `f k` values, `y[n, j] = max_i x[n, j k + i]`; positions within the row.
pub fn max_groups_forward(x: &[f32], f: usize, k: usize, y: &mut [f32], idx: &mut [u32]) {
    y.par_chunks_mut(f)
        .zip(idx.par_chunks_mut(f))
        .zip(x.par_chunks(f * k))
        .for_each(|((y_r, i_r), x_r)| {
            for j in 0..f {
                let (mut best, mut at) = (f32::NEG_INFINITY, j * k);
                for i in 0..k {
                    let v = x_r[j * k + i];
                    if !best.is_nan() && (v > best || v.is_nan()) {
                        best = v;
                        at = j * k + i;
                    }
                }
                y_r[j] = best;
                i_r[j] = at as u32;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_starts_cover_the_input_and_end_flush() {
        // 10 -> 4 with kernel 2: alpha = 8/3.
        let s = fractional_starts(0.5, 10, 4, 2);
        assert_eq!(s, vec![0, 3, 5, 8]);
        let s = fractional_starts(0.0, 10, 4, 2);
        assert_eq!(s, vec![0, 2, 5, 8]);
        let s = fractional_starts(0.99, 10, 4, 2);
        assert_eq!(s, vec![0, 3, 5, 8]);
    }

    /// The 2x2 fast path gives the general path's values and arg-max positions bit for bit,
    /// with many ties (values from five levels), NaNs and odd sizes (a dropped last row and
    /// column).
    #[test]
    fn the_2x2_path_equals_the_general_one() {
        let mut rng = crate::rng::Rng::new(3);
        for (h, w) in [(4, 4), (5, 7), (28, 28), (3, 2)] {
            let planes = 3;
            let x: Vec<f32> = (0..planes * h * w)
                .map(|_| match rng.below(12) {
                    0 => f32::NAN,
                    k => (k % 5) as f32 - 2.0,
                })
                .collect();
            let d = PoolDims {
                planes,
                h,
                w,
                oh: h / 2,
                ow: w / 2,
            };
            let win = Window {
                kh: 2,
                kw: 2,
                stride: 2,
                pad: 0,
            };
            let n = planes * d.oh * d.ow;
            let (mut y1, mut i1) = (vec![0.0; n], vec![0u32; n]);
            let (mut y2, mut i2) = (vec![0.0; n], vec![0u32; n]);
            max_forward_2x2(&x, &d, &mut y1, &mut i1);
            let rows = |oy| clipped(oy, 2, win, h);
            let cols = |ox| clipped(ox, 2, win, w);
            regions_max(&x, &d, rows, cols, &mut y2, &mut i2);
            assert_eq!(i1, i2, "{h}x{w}: arg-max positions");
            for (a, b) in y1.iter().zip(&y2) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{a} vs {b}"
                );
            }
        }
    }
}
