//! 3x3, stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), fused per band of output rows so
//! that its buffers stay in a core's L2 (x86-64 with AVX-512 or AVX2+FMA): the forward, the
//! input gradient and the weight gradient ([`weight_grad`]).
//!
//! Each 2x2 block of outputs (a tile) reads a 4x4 patch `d` of the padded input and is
//! `Y = A^T [ sum_c U_c ⊙ (B^T d_c B) ] A + b`, with `U_c = G g_c G^T` the transformed 3x3
//! kernel: 16 multiply-adds per input channel and tile where the direct convolution takes 36.
//!
//! One sample at a time, a band of tile rows at a time:
//! 1. the input transform, vectors along tiles (even and odd input columns de-interleaved):
//!    `V[ξ][c][t]` for the band's tiles `t` (ξ one of the 16 positions of the 4x4 transform);
//! 2. per block of up to 14 (AVX2: 6) tiles, per ξ and per block of one or two vectors of
//!    output channels, the product `M[ξ][t][oc] = sum_c V[ξ][c][t] U[ξ][c][oc]` in registers,
//!    exactly like the direct kernel along output channels ([`super::direct`]): per input
//!    channel two weight vectors and one broadcast per tile;
//! 3. the output transform, vectors along output channels, a register transpose per 16 (8)
//!    channels x 8 (4) tiles into rows of pixels, plus the bias.
//!
//! The transforms' coefficients are 0, ±1 and ±1/2 (the kernel's transform is computed in f64
//! and rounded once), so the only rounding beyond the direct kernel's is in their additions:
//! a relative error of a few units in the last place of the sum of `|w x|` (the tests bound it).
//! Each output is one fixed chain of operations, so results do not depend on threads.
//!
//! The input gradient of a stride-1 convolution is the same kernel on `dy` (the kernel flipped,
//! its channel axes swapped, padding `2 - pad`), as in [`super::direct`].

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::direct::{row_tiles, Isa, Shape};

/// Bytes of a band's transformed input and products together, at most (the band's tile rows
/// are chosen to fit): a quarter of the smallest L2 of the machines we meet (512 KiB per
/// core). On the Xeon with AVX2 forced, 128 KiB ran the 32-channel 28x28 convolution in 114 us,
/// 256 KiB in 158 us, 64 KiB in 127 us.
const BAND_BYTES: usize = 128 * 1024;

/// The kernel's transform matrix `G` (4 x 3) of F(2x2, 3x3): `U = G g G^T`.
const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// Whether the Winograd kernel takes this convolution: 3x3 windows, padding 0 to 2, output
/// channels in whole vectors, enough input channels that the products outweigh the transforms
/// (16), unless `REGIMEN_WINOGRAD=0` (to compare with the direct kernel).
pub fn takes(s: &Shape, isa: Isa) -> bool {
    use std::sync::OnceLock;
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("REGIMEN_WINOGRAD").is_ok_and(|v| v == "0"));
    !off && fits(s, isa)
}

fn fits(s: &Shape, isa: Isa) -> bool {
    s.kh == 3
        && s.kw == 3
        && s.pad <= 2
        && s.ok()
        && s.oh() >= 2
        && s.ow() >= 2
        && s.cin >= 16
        && s.cout.is_multiple_of(lanes(isa))
}

fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
    }
}

/// Most tiles per block of the product (two vectors of channels: 28 of AVX-512's 32 vector
/// registers accumulate, 12 of AVX2's 16).
fn pmax(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 14,
        Isa::Avx2 => 6,
    }
}

/// Where things lie for one shape.
#[derive(Clone, Copy, Debug)]
struct Geo {
    c: usize,
    oc: usize,
    h: usize,
    w: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    /// Tile rows and columns.
    ty: usize,
    tx: usize,
    /// The padded input's rows and row length: every tile's 4x4 patch lies inside.
    hp: usize,
    wp: usize,
    /// Tile rows per band.
    band: usize,
    /// A band's tiles, at most, and the length of a row of `V` (two floats per tile, and a
    /// vector to spare, which a row's last input vector writes).
    nb: usize,
    vstride: usize,
    l: usize,
}

impl Geo {
    fn new(s: &Shape, isa: Isa) -> Geo {
        let (oh, ow) = (s.oh(), s.ow());
        let (ty, tx) = (oh.div_ceil(2), ow.div_ceil(2));
        let l = lanes(isa);
        let per_row = 16 * tx * (s.cin + s.cout) * 4;
        let band = (BAND_BYTES / per_row).clamp(1, ty);
        let nb = band * tx;
        Geo {
            c: s.cin,
            oc: s.cout,
            h: s.h,
            w: s.w,
            pad: s.pad,
            oh,
            ow,
            ty,
            tx,
            hp: 2 * ty + 2,
            wp: 2 * tx + 2,
            band,
            nb,
            vstride: 2 * nb + l,
            l,
        }
    }
    /// The padded input, with room for the over-read of the last row's de-interleaving loads.
    fn xp_len(&self) -> usize {
        self.c * self.hp * self.wp + 2 * self.l + 4
    }
    /// Copies `x` (`[c, h, w]`) inside the padded buffer; its border is never written (zeroed
    /// once by the caller).
    fn pad_input(&self, x: &[f32], xp: &mut [f32]) {
        for ci in 0..self.c {
            for iy in 0..self.h {
                let dst = &mut xp[(ci * self.hp + iy + self.pad) * self.wp + self.pad..][..self.w];
                dst.copy_from_slice(&x[(ci * self.h + iy) * self.w..][..self.w]);
            }
        }
    }
    fn v_len(&self) -> usize {
        8 * self.c * self.vstride
    }
    fn m_len(&self) -> usize {
        16 * self.nb * self.oc
    }
}

/// The scratch a sample takes: [`conv`]'s padded input, transformed input and products.
pub fn scratch_len(s: &Shape, isa: Isa) -> usize {
    let g = Geo::new(s, isa);
    g.xp_len() + g.v_len() + g.m_len()
}

/// The kernel's transform `U[ξ][ci][oc] = (G g G^T)[ξ]` of the weights `w(oc, ci, ki, kj)`,
/// computed in f64 and rounded once.
pub fn pack(s: &Shape, w: impl Fn(usize, usize, usize, usize) -> f32) -> Vec<f32> {
    let (c, oc) = (s.cin, s.cout);
    let mut u = vec![0.0f32; 16 * c * oc];
    for o in 0..oc {
        for i in 0..c {
            // G g: 4 x 3.
            let mut gg = [[0.0f64; 3]; 4];
            for (a, row) in gg.iter_mut().enumerate() {
                for (kj, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|ki| G[a][ki] * w(o, i, ki, kj) as f64).sum();
                }
            }
            for a in 0..4 {
                for b in 0..4 {
                    let v: f64 = (0..3).map(|kj| gg[a][kj] * G[b][kj]).sum();
                    u[((4 * a + b) * c + i) * oc + o] = v as f32;
                }
            }
        }
    }
    u
}

/// `y` (`[cout, oh, ow]`) = the convolution of `x` (`[cin, h, w]`) with the packed weights
/// ([`pack`]), plus `bias`. `scratch` has [`scratch_len`] floats, zeroed before its first use
/// with this shape (the padded input's border is never written).
#[allow(clippy::too_many_arguments)]
pub fn conv(
    s: &Shape,
    isa: Isa,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut [f32],
    y: &mut [f32],
) {
    assert!(fits(s, isa), "the Winograd kernel does not take {s:?}");
    let g = Geo::new(s, isa);
    assert!(
        x.len() >= g.c * g.h * g.w
            && y.len() >= g.oc * g.oh * g.ow
            && u.len() >= 16 * g.c * g.oc
            && scratch.len() >= scratch_len(s, isa)
            && bias.is_none_or(|b| b.len() >= g.oc)
    );
    let (xp, rest) = scratch.split_at_mut(g.xp_len());
    let (vb, rest) = rest.split_at_mut(g.v_len());
    let mb = &mut rest[..g.m_len()];
    g.pad_input(x, xp);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was detected on this machine (`direct::isa`); the lengths were checked
    // above, and each kernel's comment says what it reads and writes.
    unsafe {
        match isa {
            Isa::Avx512 => conv512(
                &g,
                xp.as_ptr(),
                vb.as_mut_ptr(),
                u.as_ptr(),
                mb.as_mut_ptr(),
                bias,
                y.as_mut_ptr(),
            ),
            Isa::Avx2 => conv256(
                &g,
                xp.as_ptr(),
                vb.as_mut_ptr(),
                u.as_ptr(),
                mb.as_mut_ptr(),
                bias,
                y.as_mut_ptr(),
            ),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no Winograd kernel off x86-64: {xp:?} {vb:?} {mb:?} {bias:?}")
}

/// The scratch of [`weight_grad`]: [`conv`]'s, and the 16 transformed sums of a group.
pub fn dw_scratch_len(s: &Shape, isa: Isa) -> usize {
    let g = Geo::new(s, isa);
    g.xp_len() + g.v_len() + g.m_len() + 16 * g.c * g.oc
}

/// The length of [`weight_grad`]'s transposed-gradient scratch.
pub fn dyt_len(s: &Shape) -> usize {
    s.oh() * s.ow() * s.cout
}

/// Adds one sample to the weight gradient's 16 transformed sums (kept in `scratch`, of
/// [`dw_scratch_len`]; `first` starts them from zero): `W[ξ][ci][oc] += sum_t
/// (A dY_t A^T)[ξ] (B^T d_t B)[ξ]` over the sample's tiles, with `dY_t` the tile's 2x2 output
/// gradients and `d_t` its 4x4 input patch. Since the forward is linear in `U = G g G^T`, the
/// gradient of `g` is `G^T W G` ([`weight_grad_finish`]). `dy` is first transposed to
/// `[pixel][oc]` in `dyt` ([`dyt_len`]); the products hold up to 14 (AVX2: 6) input channels x
/// two vectors of output channels in registers and, per tile, load the gradients' two vectors
/// and broadcast the input's transform: 16 multiply-adds per tile and channel pair where the
/// direct kernel takes 36. `scratch` is zeroed before its first use with this shape.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad(
    s: &Shape,
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    first: bool,
    scratch: &mut [f32],
    dyt: &mut [f32],
) {
    assert!(fits(s, isa), "the Winograd kernel does not take {s:?}");
    let g = Geo::new(s, isa);
    let pixels = g.oh * g.ow;
    assert!(
        x.len() >= g.c * g.h * g.w
            && dy.len() >= g.oc * pixels
            && dyt.len() >= dyt_len(s)
            && scratch.len() >= dw_scratch_len(s, isa)
    );
    let (xp, rest) = scratch.split_at_mut(g.xp_len());
    let (vb, rest) = rest.split_at_mut(g.v_len());
    let (zb, rest) = rest.split_at_mut(g.m_len());
    let w = &mut rest[..16 * g.c * g.oc];
    if first {
        w.fill(0.0);
    }
    g.pad_input(x, xp);
    super::direct::transpose_dy(isa, dy, g.oc, pixels, dyt, g.oc);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was detected on this machine (`direct::isa`); the lengths were checked
    // above, and each kernel's comment says what it reads and writes.
    unsafe {
        let (xp, vb, dyt, zb, w) = (
            xp.as_ptr(),
            vb.as_mut_ptr(),
            dyt.as_ptr(),
            zb.as_mut_ptr(),
            w.as_mut_ptr(),
        );
        match isa {
            Isa::Avx512 => dw512(&g, xp, vb, dyt, zb, w),
            Isa::Avx2 => dw256(&g, xp, vb, dyt, zb, w),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no Winograd kernel off x86-64: {xp:?} {vb:?} {zb:?} {w:?}")
}

/// The weight gradient from [`weight_grad`]'s sums: `acc[(ci 3 + ki) 3 + kj][oc] = (G^T W G)`
/// (rows `stride` apart; the transposed layout of the direct kernel's `weight_grad_oc`),
/// overwritten. Computed in f64 and rounded once.
pub fn weight_grad_finish(s: &Shape, isa: Isa, scratch: &[f32], acc: &mut [f32], stride: usize) {
    let g = Geo::new(s, isa);
    let w = &scratch[g.xp_len() + g.v_len() + g.m_len()..][..16 * g.c * g.oc];
    assert!(stride >= g.oc && acc.len() >= (9 * g.c - 1) * stride + g.oc);
    for ci in 0..g.c {
        for o in 0..g.oc {
            let at = |xi: usize| w[(xi * g.c + ci) * g.oc + o] as f64;
            // W G: 4 x 3, then G^T (W G).
            let mut wg = [[0.0f64; 3]; 4];
            for (a, row) in wg.iter_mut().enumerate() {
                for (kj, v) in row.iter_mut().enumerate() {
                    *v = (0..4).map(|b| at(4 * a + b) * G[b][kj]).sum();
                }
            }
            for ki in 0..3 {
                for kj in 0..3 {
                    let v: f64 = (0..4).map(|a| G[a][ki] * wg[a][kj]).sum();
                    acc[((ci * 3 + ki) * 3 + kj) * stride + o] = v as f32;
                }
            }
        }
    }
}

/// The vector operations the three steps need, for one vector width.
#[cfg(target_arch = "x86_64")]
trait Simd {
    type V: Copy;
    /// Lanes.
    const L: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the first `n` lanes.
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize);
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `a b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The even lanes of `a` and the odd lanes of `b`.
    unsafe fn blend_odd(a: Self::V, b: Self::V) -> Self::V;
    /// The transpose of the `L x L` matrix in the first `L` rows.
    unsafe fn transpose(r: [Self::V; 16]) -> [Self::V; 16];
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    type V = __m512;
    const L: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
        _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn blend_odd(a: __m512, b: __m512) -> __m512 {
        _mm512_mask_blend_ps(0xAAAA, a, b)
    }
    #[inline(always)]
    unsafe fn transpose(r: [__m512; 16]) -> [__m512; 16] {
        super::direct::transpose16(r)
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type V = __m256;
    const L: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane), v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn blend_odd(a: __m256, b: __m256) -> __m256 {
        _mm256_blend_ps::<0b1010_1010>(a, b)
    }
    #[inline(always)]
    unsafe fn transpose(r: [__m256; 16]) -> [__m256; 16] {
        let t = super::direct::transpose8([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
        let mut out = r;
        out[..8].copy_from_slice(&t);
        out
    }
}

/// The whole sample, band by band.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_body<S: Simd>(
    g: &Geo,
    xp: *const f32,
    vb: *mut f32,
    u: *const f32,
    mb: *mut f32,
    bias: Option<&[f32]>,
    y: *mut f32,
    products: &[[ProductFn; 14]; 2],
    pmax: usize,
) {
    let mut ty0 = 0;
    while ty0 < g.ty {
        let rows = g.band.min(g.ty - ty0);
        input::<S>(g, xp, ty0, rows, vb);
        let n = rows * g.tx;
        for (t0, p) in row_tiles(n, pmax) {
            for xi in 0..16 {
                let (q, lane) = plane_of(xi);
                let vx = vb.add(q * g.c * g.vstride + 2 * t0 + lane);
                let ux = u.add(xi * g.c * g.oc);
                let mx = mb.add((xi * g.nb + t0) * g.oc);
                let mut oc0 = 0;
                while oc0 < g.oc {
                    let v = if g.oc - oc0 >= 2 * S::L { 2 } else { 1 };
                    products[v - 1][p - 1](g, vx, ux.add(oc0), mx.add(oc0));
                    oc0 += v * S::L;
                }
            }
        }
        output::<S>(g, mb, ty0, rows, bias, y);
        ty0 += rows;
    }
}

/// The input transform of tile rows `ty0..ty0 + rows`, `L / 2` tiles per vector, each tile's
/// two lanes holding two of its 16 values: `d B` of a patch row is `[d0 - d2, d1 + d2,
/// d2 - d1, d1 - d3]`, and over a row's contiguous inputs `x[k] - x[k + 2]` is `d0 - d2` at a
/// tile's even lane and `d1 - d3` at its odd one, `x[k + 1] + x[k + 2]` is `d1 + d2` at the
/// even lane, `x[k + 1] - x[k]` is `d2 - d1` at the odd one: three loads, three subtractions
/// and a blend per patch row, no shuffles. `B^T` then combines the 4 rows lane by lane. Plane
/// `2 i` of `V` holds, per tile, `ξ = 4 i` and `4 i + 3`; plane `2 i + 1` holds `4 i + 1` and
/// `4 i + 2` ([`plane_of`]). Tiles are counted from the band's first; a row's last vector
/// writes past its last tile, into the next row's first (written after it) or the spare
/// vector. Reads 4 padded rows from `2 ty`, columns `2 tx0 .. 2 tx0 + L + 2` (past a row's end:
/// the next row, or the buffer's spare floats; only lanes of real tiles are used).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn input<S: Simd>(g: &Geo, xp: *const f32, ty0: usize, rows: usize, vb: *mut f32) {
    let half = S::L / 2;
    let step = g.c * g.vstride;
    for c in 0..g.c {
        let plane = xp.add(c * g.hp * g.wp);
        for r in 0..rows {
            let mut tx0 = 0;
            while tx0 < g.tx {
                let base = plane.add(2 * (ty0 + r) * g.wp + 2 * tx0);
                // Per patch row: (d0 - d2 | d1 - d3) and (d1 + d2 | d2 - d1).
                let mut e = [[S::zero(); 4]; 2];
                let [e0, e1] = &mut e;
                for (i, (e0, e1)) in e0.iter_mut().zip(e1.iter_mut()).enumerate() {
                    let p = base.add(i * g.wp);
                    let (a, a1, a2) = (S::load(p), S::load(p.add(1)), S::load(p.add(2)));
                    *e0 = S::sub(a, a2);
                    *e1 = S::blend_odd(S::add(a1, a2), S::sub(a1, a));
                }
                let at = vb.add(c * g.vstride + 2 * (r * g.tx + tx0));
                for (h, e) in e.iter().enumerate() {
                    // B^T over the patch's rows.
                    let v = [
                        S::sub(e[0], e[2]),
                        S::add(e[1], e[2]),
                        S::sub(e[2], e[1]),
                        S::sub(e[1], e[3]),
                    ];
                    for (i, v) in v.into_iter().enumerate() {
                        S::store(at.add((2 * i + h) * step), v);
                    }
                }
                tx0 += half;
            }
        }
    }
}

/// Where `V` keeps position `ξ` of the transform: its plane and its lane within a tile's two.
fn plane_of(xi: usize) -> (usize, usize) {
    let (i, k) = (xi / 4, xi % 4);
    match k {
        0 => (2 * i, 0),
        3 => (2 * i, 1),
        1 => (2 * i + 1, 0),
        _ => (2 * i + 1, 1),
    }
}

/// A block of the product: see [`product`].
#[cfg(target_arch = "x86_64")]
type ProductFn = unsafe fn(&Geo, *const f32, *const f32, *mut f32);

/// `M[ξ][t][oc] = sum_c V[ξ][c][t] U[ξ][c][oc]` for `P` tiles and `V` vectors of channels:
/// `v` points at `V[ξ][0][t0]` (tiles two floats apart), `u` at `U[ξ][0][oc0]`, `m` at
/// `M[ξ][t0][oc0]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn product<S: Simd, const V: usize, const P: usize>(
    g: &Geo,
    v: *const f32,
    u: *const f32,
    m: *mut f32,
) {
    let mut acc = [[S::zero(); V]; P];
    for c in 0..g.c {
        let mut w = [S::zero(); V];
        for (j, w) in w.iter_mut().enumerate() {
            *w = S::load(u.add(c * g.oc + j * S::L));
        }
        let vc = v.add(c * g.vstride);
        for (p, a) in acc.iter_mut().enumerate() {
            let b = S::splat(*vc.add(2 * p));
            for j in 0..V {
                a[j] = S::fma(w[j], b, a[j]);
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        for (j, &a) in a.iter().enumerate() {
            S::store(m.add(p * g.oc + j * S::L), a);
        }
    }
}

/// The output transform of tile rows `ty0..ty0 + rows`, `L` channels x `L / 2` tiles at a
/// time: `A^T M A` per tile (vectors along channels), two rows of `L` pixels transposed into
/// `L` channels' rows, plus the bias. Writes output rows `2 ty0 ..` (inside `y`), masked at
/// a row's end.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn output<S: Simd>(
    g: &Geo,
    mb: *const f32,
    ty0: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: *mut f32,
) {
    let half = S::L / 2;
    let plane = g.oh * g.ow;
    for r in 0..rows {
        let oy = 2 * (ty0 + r);
        for oc0 in (0..g.oc).step_by(S::L) {
            let mut tx0 = 0;
            while tx0 < g.tx {
                let nt = half.min(g.tx - tx0);
                let mut top = [S::zero(); 16];
                let mut bottom = [S::zero(); 16];
                for j in 0..nt {
                    let mt = mb.add((r * g.tx + tx0 + j) * g.oc + oc0);
                    let m = |xi: usize| S::load(mt.add(xi * g.nb * g.oc));
                    // M A: per row i of M, the two columns.
                    let mut s = [[S::zero(); 2]; 4];
                    for (i, s) in s.iter_mut().enumerate() {
                        let (m0, m1, m2, m3) = (m(4 * i), m(4 * i + 1), m(4 * i + 2), m(4 * i + 3));
                        let mid = S::add(m1, m2);
                        *s = [S::add(m0, mid), S::sub(S::sub(m1, m2), m3)];
                    }
                    for b in 0..2 {
                        let mid = S::add(s[1][b], s[2][b]);
                        top[2 * j + b] = S::add(s[0][b], mid);
                        bottom[2 * j + b] = S::sub(S::sub(s[1][b], s[2][b]), s[3][b]);
                    }
                }
                let ox = 2 * tx0;
                let n = S::L.min(g.ow - ox);
                for (dy, rows_) in [(0, top), (1, bottom)] {
                    if oy + dy >= g.oh {
                        continue;
                    }
                    let t = S::transpose(rows_);
                    for (o, &row) in t.iter().enumerate().take(S::L) {
                        let at = y.add((oc0 + o) * plane + (oy + dy) * g.ow + ox);
                        let row = match bias {
                            Some(b) => S::add(row, S::splat(b[oc0 + o])),
                            None => row,
                        };
                        if n == S::L {
                            S::store(at, row);
                        } else {
                            S::store_first(at, row, n);
                        }
                    }
                }
                tx0 += half;
            }
        }
    }
}

macro_rules! products {
    ($f:ident, $v:literal) => {
        [
            $f::<$v, 1>,
            $f::<$v, 2>,
            $f::<$v, 3>,
            $f::<$v, 4>,
            $f::<$v, 5>,
            $f::<$v, 6>,
            $f::<$v, 7>,
            $f::<$v, 8>,
            $f::<$v, 9>,
            $f::<$v, 10>,
            $f::<$v, 11>,
            $f::<$v, 12>,
            $f::<$v, 13>,
            $f::<$v, 14>,
        ]
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn product512<const V: usize, const P: usize>(
    g: &Geo,
    v: *const f32,
    u: *const f32,
    m: *mut f32,
) {
    product::<Avx512, V, P>(g, v, u, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product256<const V: usize, const P: usize>(
    g: &Geo,
    v: *const f32,
    u: *const f32,
    m: *mut f32,
) {
    product::<Avx2, V, P>(g, v, u, m)
}

/// [`product`] for one and two vectors of channels and 1 to 14 tiles (AVX2 uses up to 6).
#[cfg(target_arch = "x86_64")]
const PRODUCT512: [[ProductFn; 14]; 2] = [products!(product512, 1), products!(product512, 2)];
#[cfg(target_arch = "x86_64")]
const PRODUCT256: [[ProductFn; 14]; 2] = [products!(product256, 1), products!(product256, 2)];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv512(
    g: &Geo,
    xp: *const f32,
    vb: *mut f32,
    u: *const f32,
    mb: *mut f32,
    bias: Option<&[f32]>,
    y: *mut f32,
) {
    conv_body::<Avx512>(g, xp, vb, u, mb, bias, y, &PRODUCT512, pmax(Isa::Avx512))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv256(
    g: &Geo,
    xp: *const f32,
    vb: *mut f32,
    u: *const f32,
    mb: *mut f32,
    bias: Option<&[f32]>,
    y: *mut f32,
) {
    conv_body::<Avx2>(g, xp, vb, u, mb, bias, y, &PRODUCT256, pmax(Isa::Avx2))
}

/// One sample's weight-gradient sums, band by band.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_body<S: Simd>(
    g: &Geo,
    xp: *const f32,
    vb: *mut f32,
    dyt: *const f32,
    zb: *mut f32,
    w: *mut f32,
    products: &[[DwFn; 14]; 2],
    rmax: usize,
) {
    let mut ty0 = 0;
    while ty0 < g.ty {
        let rows = g.band.min(g.ty - ty0);
        input::<S>(g, xp, ty0, rows, vb);
        gradient::<S>(g, dyt, ty0, rows, zb);
        let n = rows * g.tx;
        for xi in 0..16 {
            let (q, lane) = plane_of(xi);
            for (c0, r) in row_tiles(g.c, rmax) {
                let vx = vb.add((q * g.c + c0) * g.vstride + lane);
                let mut oc0 = 0;
                while oc0 < g.oc {
                    let v = if g.oc - oc0 >= 2 * S::L { 2 } else { 1 };
                    products[v - 1][r - 1](
                        g,
                        vx,
                        zb.add(xi * g.nb * g.oc + oc0),
                        n,
                        w.add((xi * g.c + c0) * g.oc + oc0),
                    );
                    oc0 += v * S::L;
                }
            }
        }
        ty0 += rows;
    }
}

/// The output gradient's transform of tile rows `ty0..ty0 + rows`, vectors along channels:
/// `Z[ξ][t][oc] = (A dY_t A^T)[ξ]`, the tile's gradients outside the output taken as zero.
/// Reads rows of `dyt` (`[pixel][oc]`) inside the output.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gradient<S: Simd>(g: &Geo, dyt: *const f32, ty0: usize, rows: usize, zb: *mut f32) {
    for r in 0..rows {
        let oy = 2 * (ty0 + r);
        for tx in 0..g.tx {
            let ox = 2 * tx;
            let t = r * g.tx + tx;
            let (right, below) = (ox + 1 < g.ow, oy + 1 < g.oh);
            for oc0 in (0..g.oc).step_by(S::L) {
                let at = |y: usize, x: usize| dyt.add((y * g.ow + x) * g.oc + oc0);
                let a = S::load(at(oy, ox));
                let b = if right {
                    S::load(at(oy, ox + 1))
                } else {
                    S::zero()
                };
                let c = if below {
                    S::load(at(oy + 1, ox))
                } else {
                    S::zero()
                };
                let d = if right && below {
                    S::load(at(oy + 1, ox + 1))
                } else {
                    S::zero()
                };
                // A dY: rows (a, b), (a + c, b + d), (a - c, b - d), (-c, -d); then each row
                // (p, q) times A^T: (p, p + q, p - q, -q).
                let z = S::zero();
                let rows_ = [
                    (a, b),
                    (S::add(a, c), S::add(b, d)),
                    (S::sub(a, c), S::sub(b, d)),
                    (S::sub(z, c), S::sub(z, d)),
                ];
                for (i, (p, q)) in rows_.into_iter().enumerate() {
                    let out = [p, S::add(p, q), S::sub(p, q), S::sub(z, q)];
                    for (k, v) in out.into_iter().enumerate() {
                        S::store(zb.add(((4 * i + k) * g.nb + t) * g.oc + oc0), v);
                    }
                }
            }
        }
    }
}

/// A block of the weight gradient's products: see [`dw_product`].
#[cfg(target_arch = "x86_64")]
type DwFn = unsafe fn(&Geo, *const f32, *const f32, usize, *mut f32);

/// `W[ξ][c][oc] += sum_t V[ξ][c][t] Z[ξ][t][oc]` over `n` tiles for `R` input channels and `V`
/// vectors of output channels: `v` points at `V[ξ][c0][0]` (tiles two floats apart, channels
/// `vstride` apart), `z` at `Z[ξ][0][oc0]`, `w` at `W[ξ][c0][oc0]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dw_product<S: Simd, const V: usize, const R: usize>(
    g: &Geo,
    v: *const f32,
    z: *const f32,
    n: usize,
    w: *mut f32,
) {
    let mut acc = [[S::zero(); V]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        for (j, a) in a.iter_mut().enumerate() {
            *a = S::load(w.add(r * g.oc + j * S::L));
        }
    }
    for t in 0..n {
        let mut zv = [S::zero(); V];
        for (j, zv) in zv.iter_mut().enumerate() {
            *zv = S::load(z.add(t * g.oc + j * S::L));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let b = S::splat(*v.add(r * g.vstride + 2 * t));
            for j in 0..V {
                a[j] = S::fma(zv[j], b, a[j]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (j, &a) in a.iter().enumerate() {
            S::store(w.add(r * g.oc + j * S::L), a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_product512<const V: usize, const R: usize>(
    g: &Geo,
    v: *const f32,
    z: *const f32,
    n: usize,
    w: *mut f32,
) {
    dw_product::<Avx512, V, R>(g, v, z, n, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_product256<const V: usize, const R: usize>(
    g: &Geo,
    v: *const f32,
    z: *const f32,
    n: usize,
    w: *mut f32,
) {
    dw_product::<Avx2, V, R>(g, v, z, n, w)
}

/// [`dw_product`] for one and two vectors of channels and 1 to 14 input channels (AVX2 uses up
/// to 6).
#[cfg(target_arch = "x86_64")]
const DW512: [[DwFn; 14]; 2] = [products!(dw_product512, 1), products!(dw_product512, 2)];
#[cfg(target_arch = "x86_64")]
const DW256: [[DwFn; 14]; 2] = [products!(dw_product256, 1), products!(dw_product256, 2)];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw512(g: &Geo, xp: *const f32, vb: *mut f32, dyt: *const f32, zb: *mut f32, w: *mut f32) {
    dw_body::<Avx512>(g, xp, vb, dyt, zb, w, &DW512, pmax(Isa::Avx512))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dw256(g: &Geo, xp: *const f32, vb: *mut f32, dyt: *const f32, zb: *mut f32, w: *mut f32) {
    dw_body::<Avx2>(g, xp, vb, dyt, zb, w, &DW256, pmax(Isa::Avx2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64, and each output's scale: the sum of `|w x|` over its window
    /// (plus `|b|`), which bounds the rounding of any order of the sum.
    fn naive(s: &Shape, x: &[f32], w: &[f32], bias: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (oh, ow) = (s.oh(), s.ow());
        let mut y = vec![0.0f64; s.cout * oh * ow];
        let mut scale = vec![0.0f64; s.cout * oh * ow];
        for o in 0..s.cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[o] as f64;
                    let mut mag = (bias[o] as f64).abs();
                    for i in 0..s.cin {
                        for ki in 0..3 {
                            for kj in 0..3 {
                                let iy = (oy + ki) as isize - s.pad as isize;
                                let ix = (ox + kj) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let t = w[((o * s.cin + i) * 3 + ki) * 3 + kj] as f64
                                    * x[(i * s.h + iy as usize) * s.w + ix as usize] as f64;
                                acc += t;
                                mag += t.abs();
                            }
                        }
                    }
                    y[(o * oh + oy) * ow + ox] = acc;
                    scale[(o * oh + oy) * ow + ox] = mag;
                }
            }
        }
        (y, scale)
    }

    fn isas() -> Vec<Isa> {
        let mut isas = vec![];
        if is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
        isas
    }

    /// Every output within 2e-6 of its scale (a few units in the last place: a wrong sign or
    /// coefficient in any transform is off by the size of a term), on shapes with odd and even
    /// sizes, every padding, one and two vectors of channels, bands of one and several tile
    /// rows and tiles in blocks of every width; the scratch reused across calls after a first
    /// input of NaNs; nothing written past the output.
    #[test]
    fn equals_the_definition_on_every_isa_and_shape() {
        let mut r = crate::Rng::new(5);
        for isa in isas() {
            let l = lanes(isa);
            for (k, &(cin, h, w, cout, pad)) in [
                (16, 28, 28, 2 * l, 1),
                (32, 14, 14, 4 * l, 1),
                (16, 7, 9, l, 1),
                (17, 5, 33, 3 * l, 2),
                (16, 6, 5, 2 * l, 0),
                (24, 9, 4, l, 2),
                (64, 14, 14, 4 * l, 1),
                (16, 40, 61, l, 1),
                // The smallest outputs (2x2: one tile; 3x3 from a 1x1 image padded by 2) and
                // several bands, the last one shorter, with an odd height.
                (16, 2, 2, l, 1),
                (16, 1, 1, l, 2),
                (16, 27, 28, 2 * l, 1),
            ]
            .iter()
            .enumerate()
            {
                let s = Shape {
                    cin,
                    h,
                    w,
                    cout,
                    kh: 3,
                    kw: 3,
                    pad,
                };
                assert!(fits(&s, isa), "{s:?}");
                let wt: Vec<f32> = (0..cout * cin * 9).map(|_| r.normal() as f32).collect();
                // Every other shape without a bias (as before batch norm, and the input gradient).
                let with_bias = k % 2 == 0;
                let b: Vec<f32> = (0..cout)
                    .map(|_| if with_bias { r.normal() as f32 } else { 0.0 })
                    .collect();
                let bias = with_bias.then_some(b.as_slice());
                let u = pack(&s, |o, i, ki, kj| wt[((o * cin + i) * 3 + ki) * 3 + kj]);
                let mut scratch = vec![0.0f32; scratch_len(&s, isa)];
                let n_out = cout * s.oh() * s.ow();
                let mut y = vec![7.0f32; n_out + 40];
                // A first input of NaNs through the same scratch: nothing of it may remain.
                let nan = vec![f32::NAN; cin * h * w];
                conv(&s, isa, &nan, &u, bias, &mut scratch, &mut y);
                assert!(y[..n_out].iter().all(|v| v.is_nan()), "{s:?} {isa:?}");
                let x: Vec<f32> = (0..cin * h * w).map(|_| r.normal() as f32).collect();
                conv(&s, isa, &x, &u, bias, &mut scratch, &mut y);
                let (want, scale) = naive(&s, &x, &wt, &b);
                for (i, ((&got, &want), &scale)) in y.iter().zip(&want).zip(&scale).enumerate() {
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= 2e-6 * scale,
                        "{s:?} {isa:?} output {i}: {got} vs {want} (scale {scale})"
                    );
                }
                assert!(
                    y[n_out..].iter().all(|&v| v == 7.0),
                    "{s:?} {isa:?}: wrote past the output"
                );
            }
        }
    }

    /// The weight gradient over two samples (the sums started by the first, added to by the
    /// second) within 2e-6 of each element's scale, the sum of `|x dy|` of the definition; on
    /// the same shapes as the forward.
    #[test]
    fn weight_gradient_equals_the_definition() {
        let mut r = crate::Rng::new(6);
        for isa in isas() {
            let l = lanes(isa);
            for &(cin, h, w, cout, pad) in &[
                (16, 28, 28, 2 * l, 1),
                (32, 14, 14, 4 * l, 1),
                (17, 5, 33, 3 * l, 2),
                (16, 6, 5, 2 * l, 0),
                (24, 9, 4, l, 2),
                (16, 40, 61, l, 1),
                (16, 2, 2, l, 1),
                (16, 1, 1, l, 2),
                (16, 27, 28, 2 * l, 1),
            ] {
                let s = Shape {
                    cin,
                    h,
                    w,
                    cout,
                    kh: 3,
                    kw: 3,
                    pad,
                };
                let (oh, ow) = (s.oh(), s.ow());
                let mut scratch = vec![0.0f32; dw_scratch_len(&s, isa)];
                let mut dyt = vec![0.0f32; dyt_len(&s)];
                let mut want = vec![0.0f64; cin * 9 * cout];
                let mut scale = vec![0.0f64; cin * 9 * cout];
                for n in 0..2 {
                    let x: Vec<f32> = (0..cin * h * w).map(|_| r.normal() as f32).collect();
                    let dy: Vec<f32> = (0..cout * oh * ow).map(|_| r.normal() as f32).collect();
                    weight_grad(&s, isa, &x, &dy, n == 0, &mut scratch, &mut dyt);
                    for o in 0..cout {
                        for i in 0..cin {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let k = ((i * 3 + ki) * 3 + kj) * cout + o;
                                    for oy in 0..oh {
                                        for ox in 0..ow {
                                            let iy = (oy + ki) as isize - pad as isize;
                                            let ix = (ox + kj) as isize - pad as isize;
                                            if iy < 0
                                                || ix < 0
                                                || iy >= h as isize
                                                || ix >= w as isize
                                            {
                                                continue;
                                            }
                                            let t = x[(i * h + iy as usize) * w + ix as usize]
                                                as f64
                                                * dy[(o * oh + oy) * ow + ox] as f64;
                                            want[k] += t;
                                            scale[k] += t.abs();
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                let stride = cout + 3;
                let mut acc = vec![7.0f32; 9 * cin * stride];
                weight_grad_finish(&s, isa, &scratch, &mut acc, stride);
                // The transforms mix the nine taps of one input and output channel: each tap's
                // rounding is bounded by the largest of their magnitudes (a tap with one small
                // term, as in a 2x2 image, can carry its neighbours' rounding).
                let tile_scale = |row: usize, o: usize| -> f64 {
                    let i = row / 9;
                    (0..9)
                        .map(|t| scale[(i * 9 + t) * cout + o])
                        .fold(0.0, f64::max)
                };
                for row in 0..9 * cin {
                    for o in 0..cout {
                        let (got, want, scale) = (
                            acc[row * stride + o] as f64,
                            want[row * cout + o],
                            tile_scale(row, o),
                        );
                        assert!(
                            (got - want).abs() <= 2e-6 * scale,
                            "{s:?} {isa:?} row {row} channel {o}: {got} vs {want} (scale {scale})"
                        );
                    }
                    assert!(acc[row * stride + cout..(row + 1) * stride]
                        .iter()
                        .all(|&v| v == 7.0));
                }
            }
        }
    }

    #[test]
    fn row_tiles_cover_the_tiles() {
        for n in 1..100 {
            for pmax in [6, 14] {
                let b: Vec<_> = row_tiles(n, pmax).collect();
                assert_eq!(b.len(), n.div_ceil(pmax));
                let mut next = 0;
                for (first, count) in b {
                    assert_eq!(first, next);
                    assert!((1..=pmax).contains(&count));
                    next += count;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn takes_only_what_it_can() {
        let s = |cin, cout, k, pad| Shape {
            cin,
            h: 8,
            w: 8,
            cout,
            kh: k,
            kw: k,
            pad,
        };
        for isa in isas() {
            assert!(fits(&s(32, 32, 3, 1), isa));
            assert!(!fits(&s(32, 32, 5, 1), isa));
            assert!(!fits(&s(8, 32, 3, 1), isa));
            assert!(!fits(&s(32, 12, 3, 1), isa));
        }
    }
}
