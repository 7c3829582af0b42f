//! Batch normalization and dropout on the CPU. Tensors are `[N, C, inner]`.

use rayon::prelude::*;

use super::pool::takes;
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

/// What follows batch norm in its own passes over memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    Relu,
    /// A ReLU, then a 2x2 max pool of stride 2 over planes of `h x w` (the output is
    /// `[N, C, h / 2, w / 2]`, as the pool floors).
    ReluPool2x2 {
        h: usize,
        w: usize,
    },
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

/// Per channel, `(sum g, sum g (x - mean[c]))` over the `N inner` values of that channel,
/// `g` the gradient of batch norm's output ([`out_grad`]: `dy` itself, or `dy` taken back
/// through what followed).
/// The blocks of `inner` values are read in memory order (streaming, in parallel), each summed
/// in eight f32 lanes over zipped slices (vectorized) into an f64 pair; the pairs are then added
/// per channel in sample order: the result does not depend on the number of threads.
fn dy_sums(
    x: &[f32],
    dy: &[f32],
    after: (After, Option<&Affine>),
    mean: &[f32],
    d: &NormDims,
) -> Vec<(f64, f64)> {
    let inner = d.inner.max(1);
    let blocks: Vec<(f64, f64)> = x
        .par_chunks(inner)
        .enumerate()
        .with_min_len((16384 / inner).max(1))
        .map_init(Vec::new, |owned: &mut Vec<f32>, (b, xb)| {
            let mu = mean[b % d.c];
            let gb: &[f32] = match after {
                (After::Nothing, _) | (_, None) => &dy[b * inner..b * inner + xb.len()],
                (after, Some(a)) => {
                    owned.resize(xb.len(), 0.0);
                    out_grad(after, a, b % d.c, b, xb, dy, owned);
                    owned
                }
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

/// Block `b` (channel `c`, values `xb`) of the gradient of batch norm's output, from `dy`, the
/// gradient of what followed it: through the ReLU (where the forward's `z`, recomputed from
/// `x` bit for bit, was not above zero, it is zero), and through the 2x2 max pool (the
/// gradient of each window's maximum, found again by the pool's rule, goes to its position).
/// The values are those of running the layers one by one, bit for bit.
fn out_grad(after: After, a: &Affine, c: usize, b: usize, xb: &[f32], dy: &[f32], g: &mut [f32]) {
    let (sc, sh) = (a.scale[c], a.shift[c]);
    match after {
        After::Nothing => g.copy_from_slice(&dy[b * xb.len()..(b + 1) * xb.len()]),
        After::Relu => {
            let gb = &dy[b * xb.len()..(b + 1) * xb.len()];
            for ((o, &x), &d) in g.iter_mut().zip(xb).zip(gb) {
                *o = relu_grad(x * sc + sh, d);
            }
        }
        After::ReluPool2x2 { h, w } => {
            use std::sync::OnceLock;
            static PLANE: OnceLock<ReluPoolGrad> = OnceLock::new();
            let plane = PLANE.get_or_init(relu_pool_grad_dispatch);
            let (oh, ow) = (h / 2, w / 2);
            plane(xb, &dy[b * oh * ow..(b + 1) * oh * ow], sc, sh, h, w, g)
        }
    }
}

/// One plane of `relu(x sc + sh)`, max-pooled 2x2 with stride 2: the pool's rule (the
/// window in row-major order, the first maximum wins, NaN propagates) over the ReLU's output.
#[inline(always)]
fn relu_pool_plane(x_p: &[f32], sc: f32, sh: f32, w: usize, oh: usize, ow: usize, y_p: &mut [f32]) {
    let r = |v: f32| relu(v * sc + sh);
    for oy in 0..oh {
        let (t0, t1) = (2 * oy * w, (2 * oy + 1) * w);
        let (r0, r1) = (&x_p[t0..t0 + 2 * ow], &x_p[t1..t1 + 2 * ow]);
        let yo = &mut y_p[oy * ow..(oy + 1) * ow];
        for ((a, b), yv) in r0.chunks_exact(2).zip(r1.chunks_exact(2)).zip(yo) {
            let mut best = r(a[0]);
            for v in [r(a[1]), r(b[0]), r(b[1])] {
                best = if takes(best, v) { v } else { best };
            }
            *yv = best;
        }
    }
}

type ReluPoolPlane = fn(&[f32], f32, f32, usize, usize, usize, &mut [f32]);

/// The vector width the kernels below are compiled for: AVX-512 (with its byte and vector
/// length extensions, as the max pool's), AVX2 and FMA, or none.
fn vector_isa() -> Option<super::direct::Isa> {
    use super::direct::{isa, Isa};
    #[cfg(target_arch = "x86_64")]
    if isa() == Some(Isa::Avx512)
        && !(is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl"))
    {
        return Some(Isa::Avx2);
    }
    isa()
}

/// [`relu_pool_plane`] compiled for the widest vectors the machine has.
fn relu_pool_dispatch() -> ReluPoolPlane {
    #[cfg(target_arch = "x86_64")]
    {
        use super::direct::Isa;
        match vector_isa() {
            // SAFETY: the features were detected.
            Some(Isa::Avx512) => {
                return |x, sc, sh, w, oh, ow, y| unsafe {
                    relu_pool_avx512(x, sc, sh, w, oh, ow, y)
                }
            }
            Some(Isa::Avx2) => {
                return |x, sc, sh, w, oh, ow, y| unsafe { relu_pool_avx2(x, sc, sh, w, oh, ow, y) }
            }
            None => {}
        }
    }
    relu_pool_plane
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn relu_pool_avx512(
    x: &[f32],
    sc: f32,
    sh: f32,
    w: usize,
    oh: usize,
    ow: usize,
    y: &mut [f32],
) {
    relu_pool_plane(x, sc, sh, w, oh, ow, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn relu_pool_avx2(
    x: &[f32],
    sc: f32,
    sh: f32,
    w: usize,
    oh: usize,
    ow: usize,
    y: &mut [f32],
) {
    relu_pool_plane(x, sc, sh, w, oh, ow, y)
}

/// The gradient of `z = x sc + sh` (one `h x w` plane) through a ReLU and a 2x2 max pool of
/// stride 2, from the pool's output gradient `dy_p`: as the pool's backward (which adds the
/// gradient onto zeros at each window's arg-max), then the ReLU's. Straight-line selects, so
/// that the window loop vectorizes (compiled per instruction set: [`relu_pool_grad_dispatch`]).
#[inline(always)]
fn relu_pool_grad_plane(
    x_p: &[f32],
    dy_p: &[f32],
    sc: f32,
    sh: f32,
    h: usize,
    w: usize,
    g: &mut [f32],
) {
    let (oh, ow) = (h / 2, w / 2);
    let z = |v: f32| v * sc + sh;
    let r = relu;
    for oy in 0..oh {
        let (t0, t1) = (2 * oy * w, (2 * oy + 1) * w);
        let (x0, x1) = (&x_p[t0..t0 + 2 * ow], &x_p[t1..t1 + 2 * ow]);
        let (g0, g1) = g[t0..t1 + 2 * ow].split_at_mut(w);
        let dyo = &dy_p[oy * ow..(oy + 1) * ow];
        let windows = x0.chunks_exact(2).zip(x1.chunks_exact(2));
        let outs = g0.chunks_exact_mut(2).zip(g1.chunks_exact_mut(2));
        for (((a, b), (ga, gb)), &d) in windows.zip(outs).zip(dyo) {
            let (z0, z1, z2, z3) = (z(a[0]), z(a[1]), z(b[0]), z(b[1]));
            // The pool's rule: a later value is taken when above the best so far or NaN, and
            // a NaN taken stays; the arg-max is the last one taken.
            let step = |best: f32, v: f32| {
                let take = takes(best, v);
                (if take { v } else { best }, take)
            };
            let (b1, take1) = step(r(z0), r(z1));
            let (b2, take2) = step(b1, r(z2));
            let (_, take3) = step(b2, r(z3));
            let sel = [
                !(take1 | take2 | take3),
                take1 & !take2 & !take3,
                take2 & !take3,
                take3,
            ];
            let d = 0.0 + d;
            let pick = |k: usize| if sel[k] { d } else { 0.0 };
            ga[0] = relu_grad(z0, pick(0));
            ga[1] = relu_grad(z1, pick(1));
            gb[0] = relu_grad(z2, pick(2));
            gb[1] = relu_grad(z3, pick(3));
        }
    }
    relu_pool_grad_edges(x_p, sc, sh, h, w, g);
}

/// The part of [`relu_pool_grad_plane`] outside every window: an odd last column and row.
#[inline(always)]
fn relu_pool_grad_edges(x_p: &[f32], sc: f32, sh: f32, h: usize, w: usize, g: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    for t in (0..2 * oh).map(|y| y * w) {
        for j in 2 * ow..w {
            g[t + j] = relu_grad(x_p[t + j] * sc + sh, 0.0);
        }
    }
    for j in 2 * oh * w..h * w {
        g[j] = relu_grad(x_p[j] * sc + sh, 0.0);
    }
}

type ReluPoolGrad = fn(&[f32], &[f32], f32, f32, usize, usize, &mut [f32]);

/// [`relu_pool_grad_plane`] compiled for the widest vectors the machine has.
fn relu_pool_grad_dispatch() -> ReluPoolGrad {
    #[cfg(target_arch = "x86_64")]
    {
        use super::direct::Isa;
        match vector_isa() {
            // SAFETY: the features were detected.
            Some(Isa::Avx512) => {
                return |x, d, sc, sh, h, w, g| unsafe {
                    relu_pool_grad_avx512(x, d, sc, sh, h, w, g)
                }
            }
            Some(Isa::Avx2) => {
                return |x, d, sc, sh, h, w, g| unsafe {
                    relu_pool_grad_avx2(x, d, sc, sh, h, w, g)
                }
            }
            None => {}
        }
    }
    relu_pool_grad_plane
}

/// [`relu_pool_grad_plane`] in AVX-512: sixteen windows at a time, their corners
/// de-interleaved from two row vectors each, the same operations lane by lane, the results
/// interleaved back (masked loads and stores at the row's end).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn relu_pool_grad_avx512(
    x: &[f32],
    dy: &[f32],
    sc: f32,
    sh: f32,
    h: usize,
    w: usize,
    g: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (oh, ow) = (h / 2, w / 2);
    assert!(x.len() >= h * w && g.len() >= h * w && dy.len() >= oh * ow);
    let (scv, shv, zero) = (_mm512_set1_ps(sc), _mm512_set1_ps(sh), _mm512_setzero_ps());
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    // z = x sc + sh, unfused as in the scalar code; the ReLU's output; the pool's step.
    let z = |v: __m512| _mm512_add_ps(_mm512_mul_ps(v, scv), shv);
    let relu = |z: __m512| _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LE_OQ>(z, zero), z, zero);
    let step = |best: __m512, v: __m512| {
        let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, best);
        let ord = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(best, best);
        let take = !le & ord;
        (_mm512_mask_blend_ps(take, best, v), take)
    };
    // relu_grad(z, p): p where z > 0, z where z is NaN, else 0.
    let grad = |z: __m512, p: __m512| {
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, zero);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z);
        _mm512_mask_mov_ps(_mm512_maskz_mov_ps(gt, p), nan, z)
    };
    let (xp, gp, dp) = (x.as_ptr(), g.as_mut_ptr(), dy.as_ptr());
    for oy in 0..oh {
        let (t0, t1) = (2 * oy * w, (2 * oy + 1) * w);
        for ox0 in (0..ow).step_by(16) {
            let n = (ow - ox0).min(16);
            let m: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            let m_lo: __mmask16 = ((1u32 << (2 * n).min(16)) - 1) as __mmask16;
            let m_hi: __mmask16 = ((1u32 << (2 * n).saturating_sub(16)) - 1) as __mmask16;
            let corners = |t: usize| {
                let a = _mm512_maskz_loadu_ps(m_lo, xp.add(t + 2 * ox0));
                let b = _mm512_maskz_loadu_ps(m_hi, xp.add(t + 2 * ox0 + 16));
                (
                    z(_mm512_permutex2var_ps(a, even, b)),
                    z(_mm512_permutex2var_ps(a, odd, b)),
                )
            };
            let (z0, z1) = corners(t0);
            let (z2, z3) = corners(t1);
            let (b1, take1) = step(relu(z0), relu(z1));
            let (b2, take2) = step(b1, relu(z2));
            let (_, take3) = step(b2, relu(z3));
            let d = _mm512_add_ps(zero, _mm512_maskz_loadu_ps(m, dp.add(oy * ow + ox0)));
            let g0 = grad(z0, _mm512_maskz_mov_ps(!(take1 | take2 | take3), d));
            let g1 = grad(z1, _mm512_maskz_mov_ps(take1 & !take2 & !take3, d));
            let g2 = grad(z2, _mm512_maskz_mov_ps(take2 & !take3, d));
            let g3 = grad(z3, _mm512_maskz_mov_ps(take3, d));
            for (t, ga, gb) in [(t0, g0, g1), (t1, g2, g3)] {
                let at = gp.add(t + 2 * ox0);
                _mm512_mask_storeu_ps(at, m_lo, _mm512_permutex2var_ps(ga, lo, gb));
                _mm512_mask_storeu_ps(at.add(16), m_hi, _mm512_permutex2var_ps(ga, hi, gb));
            }
        }
    }
    relu_pool_grad_edges(x, sc, sh, h, w, g);
}

/// [`relu_pool_grad_plane`] in AVX2, as [`relu_pool_grad_avx512`]: eight windows at a time
/// (the compiler had left the portable loop scalar: 19% of cnn-step with AVX2 forced).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn relu_pool_grad_avx2(
    x: &[f32],
    dy: &[f32],
    sc: f32,
    sh: f32,
    h: usize,
    w: usize,
    g: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (oh, ow) = (h / 2, w / 2);
    assert!(x.len() >= h * w && g.len() >= h * w && dy.len() >= oh * ow);
    let (scv, shv, zero) = (_mm256_set1_ps(sc), _mm256_set1_ps(sh), _mm256_setzero_ps());
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let first = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
    // z = x sc + sh, unfused as in the scalar code; the ReLU's output; the pool's step.
    let z = |v: __m256| _mm256_add_ps(_mm256_mul_ps(v, scv), shv);
    let relu = |z: __m256| _mm256_blendv_ps(z, zero, _mm256_cmp_ps::<_CMP_LE_OQ>(z, zero));
    let step = |best: __m256, v: __m256| {
        let le = _mm256_cmp_ps::<_CMP_LE_OQ>(v, best);
        let ord = _mm256_cmp_ps::<_CMP_EQ_OQ>(best, best);
        let take = _mm256_andnot_ps(le, ord);
        (_mm256_blendv_ps(best, v, take), take)
    };
    // relu_grad(z, p): p where z > 0, z where z is NaN, else 0.
    let grad = |z: __m256, p: __m256| {
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(z, zero);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z);
        _mm256_blendv_ps(_mm256_and_ps(gt, p), z, nan)
    };
    // Even and odd elements of 16 consecutive ones: in-lane shuffles, then 64-bit pairs in
    // order 0, 2, 1, 3.
    let split = |a: __m256, b: __m256| {
        let pairs = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (
            pairs(_mm256_shuffle_ps::<0b10_00_10_00>(a, b)),
            pairs(_mm256_shuffle_ps::<0b11_01_11_01>(a, b)),
        )
    };
    let (xp, gp, dp) = (x.as_ptr(), g.as_mut_ptr(), dy.as_ptr());
    for oy in 0..oh {
        let (t0, t1) = (2 * oy * w, (2 * oy + 1) * w);
        for ox0 in (0..ow).step_by(8) {
            let n = (ow - ox0).min(8);
            let (m, m_lo, m_hi) = (
                first(n),
                first((2 * n).min(8)),
                first((2 * n).saturating_sub(8)),
            );
            let corners = |t: usize| {
                let a = _mm256_maskload_ps(xp.add(t + 2 * ox0), m_lo);
                let b = _mm256_maskload_ps(xp.add(t + 2 * ox0 + 8), m_hi);
                let (e, o) = split(a, b);
                (z(e), z(o))
            };
            let (z0, z1) = corners(t0);
            let (z2, z3) = corners(t1);
            let (b1, take1) = step(relu(z0), relu(z1));
            let (b2, take2) = step(b1, relu(z2));
            let (_, take3) = step(b2, relu(z3));
            let d = _mm256_add_ps(zero, _mm256_maskload_ps(dp.add(oy * ow + ox0), m));
            let later = _mm256_or_ps(take2, take3);
            let g0 = grad(z0, _mm256_andnot_ps(_mm256_or_ps(take1, later), d));
            let g1 = grad(z1, _mm256_and_ps(_mm256_andnot_ps(later, take1), d));
            let g2 = grad(z2, _mm256_and_ps(_mm256_andnot_ps(take3, take2), d));
            let g3 = grad(z3, _mm256_and_ps(take3, d));
            for (t, ga, gb) in [(t0, g0, g1), (t1, g2, g3)] {
                let at = gp.add(t + 2 * ox0);
                let (lo, hi) = (_mm256_unpacklo_ps(ga, gb), _mm256_unpackhi_ps(ga, gb));
                let (first8, next8) = (
                    _mm256_permute2f128_ps::<0x20>(lo, hi),
                    _mm256_permute2f128_ps::<0x31>(lo, hi),
                );
                if n == 8 {
                    _mm256_storeu_ps(at, first8);
                    _mm256_storeu_ps(at.add(8), next8);
                } else {
                    _mm256_maskstore_ps(at, m_lo, first8);
                    _mm256_maskstore_ps(at.add(8), m_hi, next8);
                }
            }
        }
    }
    relu_pool_grad_edges(x, sc, sh, h, w, g);
}

/// The ReLU layer's rule: zero where `z <= 0`, `z` elsewhere (NaN propagates).
#[inline(always)]
fn relu(z: f32) -> f32 {
    if z <= 0.0 {
        0.0
    } else {
        z
    }
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
/// mean and sum of squared deviations ([`block_stats`]), and the blocks of each channel are
/// merged in sample order with Chan et al.'s parallel formula in f64 (no `E[x^2] - E[x]^2`
/// cancellation). `known`: the blocks' statistics, already computed by whoever wrote `x` (a
/// convolution, while each sample was in cache), so that `x` is not read for them.
fn channel_mean_var(x: &[f32], d: &NormDims, known: Option<&[(f64, f64, f64)]>) -> Vec<(f64, f64)> {
    let inner = d.inner.max(1);
    let computed: Vec<(f64, f64, f64)>;
    let blocks: &[(f64, f64, f64)] = match known {
        Some(k) if k.len() == x.len().div_ceil(inner) => k,
        _ => {
            computed = x
                .par_chunks(inner)
                .with_min_len((16384 / inner).max(1))
                .map(block_stats)
                .collect();
            &computed
        }
    };
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

/// One block's `(count, mean, sum of squared deviations)`: sums in 32 f32 lanes (so that the
/// loops vectorize into independent chains), the mean in f64, then the squared deviations from
/// it likewise. The same bits wherever it runs.
pub fn block_stats(blk: &[f32]) -> (f64, f64, f64) {
    const L: usize = 32;
    let nb = blk.len() as f64;
    let mut lanes = [0.0f32; L];
    let mut chunks = blk.chunks_exact(L);
    for ch in &mut chunks {
        for k in 0..L {
            lanes[k] += ch[k];
        }
    }
    let sum = lanes.iter().map(|&v| v as f64).sum::<f64>()
        + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>();
    let mb = sum / nb;
    let mb32 = mb as f32;
    let mut sq = [0.0f32; L];
    let mut chunks = blk.chunks_exact(L);
    for ch in &mut chunks {
        for k in 0..L {
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
}

/// Writes `y` (followed by what `after` says, in the same pass); returns
/// `(mean, invstd, var_biased)`. `known`: the statistics of `x`'s blocks of `inner` values, when
/// its writer left them ([`block_stats`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: &NormDims,
    eps: f32,
    after: After,
    known: Option<&[(f64, f64, f64)]>,
    y: &mut [f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let stats = channel_mean_var(x, d, known);
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
    let invstd: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    // y = scale x + shift with scale = gamma invstd, shift = beta - mean scale.
    let a = Affine::new(gamma, beta, &mean, &invstd);
    if let After::ReluPool2x2 { h, w } = after {
        let (oh, ow) = (h / 2, w / 2);
        let plane = relu_pool_dispatch();
        y.par_chunks_mut(oh * ow)
            .with_min_len((4096 / (oh * ow).max(1)).max(1))
            .enumerate()
            .for_each(|(b, y_p)| {
                let c = b % d.c;
                let x_p = &x[b * h * w..(b + 1) * h * w];
                plane(x_p, a.scale[c], a.shift[c], w, oh, ow, y_p);
            });
        return (mean, invstd, var.iter().map(|&v| v as f32).collect());
    }
    per_block(d, y, |c, r, out| {
        let (sc, sh) = (a.scale[c], a.shift[c]);
        if after == After::Relu {
            // The ReLU layer's rule: NaN propagates.
            for (o, &v) in out.iter_mut().zip(&x[r]) {
                *o = relu(v * sc + sh);
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
/// `dx = gamma invstd dy` with fixed ones. With `after` other than [`After::Nothing`] (the
/// forward's beta given in `beta`), `dy` is the gradient of what followed batch norm in its
/// passes, turned into batch norm's output gradient on the fly ([`out_grad`]).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    after: After,
    beta: Option<&[f32]>,
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    d: &NormDims,
    batch_stats: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dx: &mut [f32],
) {
    let relu = match (after, beta) {
        (After::Nothing, _) => None,
        (_, Some(beta)) => Some(Affine::new(gamma, beta, mean, invstd)),
        (_, None) => panic!("batch norm's backward through {after:?} needs the forward's beta"),
    };
    let relu = relu.as_ref();
    // sum dy xhat = invstd sum dy (x - mean).
    let sums: Vec<(f64, f64)> = dy_sums(x, dy, (after, relu), mean, d)
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
            match (after, relu) {
                (After::Relu, Some(a)) => {
                    let (sc, sh) = (a.scale[c], a.shift[c]);
                    for ((o, &xv), &g) in xs.zip(&dy[r]) {
                        let xhat = (xv - mu) * is;
                        *o = k * (relu_grad(xv * sc + sh, g) - mdy - xhat * mdyx);
                    }
                }
                (After::ReluPool2x2 { .. }, Some(a)) => {
                    // The output gradient first, in place, then the formula.
                    let (xb, b) = (&x[r.clone()], r.start / d.inner.max(1));
                    out_grad(after, a, c, b, xb, dy, out);
                    for (o, &xv) in out.iter_mut().zip(xb) {
                        let xhat = (xv - mu) * is;
                        *o = k * (*o - mdy - xhat * mdyx);
                    }
                }
                _ => {
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
            match relu {
                Some(a) => {
                    let (xb, b) = (&x[r.clone()], r.start / d.inner.max(1));
                    out_grad(after, a, c, b, xb, dy, out);
                    out.iter_mut().for_each(|o| *o *= k);
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

/// [`dropout`] in place, keeping no mask: `y[i] *= (u_i >= p) / (1 - p)`, the same draws
/// and the same products (a linear layer's fused ReLU and dropout).
pub fn dropout_in_place(y: &mut [f32], p: f32, stream: u64, step: u32, purpose: u32) {
    let keep = 1.0 / (1.0 - p);
    const CHUNK: usize = 1 << 13;
    y.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, y)| {
        let mut u = [0f32; CHUNK];
        let u = &mut u[..y.len()];
        fill_uniform(stream, step, purpose, (ci * CHUNK) as u64, u);
        for (y, &u) in y.iter_mut().zip(u.iter()) {
            *y *= if u >= p { keep } else { 0.0 };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Planes with ties, zeros, negative values, NaNs and infinities, and output gradients
    /// with both zeros: every instruction set's kernels give the portable code's bits.
    #[test]
    fn relu_pool_kernels_equal_the_portable_code() {
        let mut r = crate::Rng::new(9);
        let specials = [0.0, -0.0, 1.0, 1.0, -1.0, f32::NAN, f32::INFINITY, 0.5];
        for &(h, w) in &[
            (2, 2),
            (6, 6),
            (7, 5),
            (28, 28),
            (14, 14),
            (3, 40),
            (5, 33),
            (4, 66),
        ] {
            let x: Vec<f32> = (0..h * w)
                .map(|i| {
                    if i % 7 == 3 {
                        specials[(i / 7) % specials.len()]
                    } else {
                        r.normal() as f32
                    }
                })
                .collect();
            let (oh, ow) = (h / 2, w / 2);
            let dy: Vec<f32> = (0..oh * ow)
                .map(|i| match i % 5 {
                    0 => -0.0,
                    1 => 0.0,
                    _ => r.normal() as f32,
                })
                .collect();
            for (sc, sh) in [(1.0f32, 0.0f32), (0.7, -0.2), (-1.3, 0.1)] {
                let mut want_y = vec![0.0f32; oh * ow];
                relu_pool_plane(&x, sc, sh, w, oh, ow, &mut want_y);
                let mut want_g = vec![7.0f32; h * w];
                relu_pool_grad_plane(&x, &dy, sc, sh, h, w, &mut want_g);
                let mut y = vec![7.0f32; oh * ow];
                relu_pool_dispatch()(&x, sc, sh, w, oh, ow, &mut y);
                let mut g = vec![7.0f32; h * w + 16];
                relu_pool_grad_dispatch()(&x, &dy, sc, sh, h, w, &mut g[..h * w]);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want_y), "forward {h}x{w} sc {sc} sh {sh}");
                assert_eq!(
                    bits(&g[..h * w]),
                    bits(&want_g),
                    "backward {h}x{w} sc {sc} sh {sh}"
                );
                assert!(g[h * w..].iter().all(|&v| v == 7.0), "wrote past the plane");
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected.
                    unsafe {
                        relu_pool_avx2(&x, sc, sh, w, oh, ow, &mut y);
                        relu_pool_grad_avx2(&x, &dy, sc, sh, h, w, &mut g[..h * w]);
                    }
                    assert_eq!(bits(&y), bits(&want_y), "AVX2 forward {h}x{w}");
                    assert_eq!(bits(&g[..h * w]), bits(&want_g), "AVX2 backward {h}x{w}");
                    assert!(
                        g[h * w..].iter().all(|&v| v == 7.0),
                        "AVX2 wrote past the plane"
                    );
                }
            }
        }
    }

    /// The portable gradient against the layers' definition: the pool's backward (gradient
    /// onto zeros at the first maximum of relu(z), NaN taken first), then the ReLU's.
    #[test]
    fn relu_pool_gradient_is_the_pool_then_the_relu() {
        let (h, w) = (5, 7);
        let x: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let dy: Vec<f32> = (0..(h / 2) * (w / 2)).map(|i| i as f32 + 1.0).collect();
        let (sc, sh) = (0.5f32, 0.25f32);
        let z: Vec<f32> = x.iter().map(|&v| v * sc + sh).collect();
        let relu: Vec<f32> = z.iter().map(|&v| v.max(0.0)).collect();
        let mut want = vec![0.0f32; h * w];
        for oy in 0..h / 2 {
            for ox in 0..w / 2 {
                let cells = [
                    2 * oy * w + 2 * ox,
                    2 * oy * w + 2 * ox + 1,
                    (2 * oy + 1) * w + 2 * ox,
                    (2 * oy + 1) * w + 2 * ox + 1,
                ];
                let best = cells.iter().map(|&i| relu[i]).fold(f32::MIN, f32::max);
                let at = *cells.iter().find(|&&i| relu[i] == best).unwrap();
                want[at] += dy[oy * (w / 2) + ox];
            }
        }
        for (g, &zv) in want.iter_mut().zip(&z) {
            if zv <= 0.0 {
                *g = 0.0;
            }
        }
        let mut g = vec![0.0f32; h * w];
        relu_pool_grad_plane(&x, &dy, sc, sh, h, w, &mut g);
        assert_eq!(g, want);
        assert!(g.iter().any(|&v| v > 0.0) && g.iter().filter(|&&v| v == 0.0).count() > h * w / 2);
    }
}
