//! Direct convolution of stride-1 windows, without a column matrix (x86-64 with AVX-512 or
//! AVX2+FMA, chosen at run time; other machines keep im2col + gemm).
//!
//! One sample at a time: the input is copied once into a zero-padded buffer (`[C, HP, WP]`,
//! rows wide enough that every vector load stays inside), the weights are packed per block of
//! `OB` output channels as `[block][ci][ki][kj][OB]`. The microkernel computes a tile of `OB`
//! output channels x two output vectors ("slots": two 16-wide (or 8-wide) pieces of output
//! rows, from one row or two), accumulating in registers over every input channel and window
//! position: per loaded input vector `OB` multiply-adds, with the weights broadcast from the
//! packed block. Masked stores write the valid lanes.
//!
//! The same kernel computes a stride-1 convolution's input gradient: `dx` is the convolution
//! of `dy`, padded by `k - 1 - pad`, with the kernel flipped and its channel axes swapped. Each
//! output element is one sum in a fixed order, so results do not depend on threads.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Which vector width the machine takes (`None`: use im2col + gemm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
}

/// Whether the CPU kernels may use AVX-512: the machine has it and `REGIMEN_DIRECT_ISA=avx2`
/// does not hold them to AVX2 (`bench/compare-avx2`, and tests of the AVX2 paths end to end).
/// Every kernel chosen at run time asks this (the matrix products' `gemm` crate chooses its
/// own, by how it was built).
pub fn avx512_allowed() -> bool {
    use std::sync::OnceLock;
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && !std::env::var("REGIMEN_DIRECT_ISA").is_ok_and(|v| v == "avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

pub fn isa() -> Option<Isa> {
    use std::sync::OnceLock;
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("REGIMEN_NO_DIRECT_CONV").is_ok_and(|v| v == "1") {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_allowed() {
                return Some(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(Isa::Avx2);
            }
        }
        None
    })
}

impl Isa {
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }
    /// Output channels per tile for `cout` channels (two accumulators each, in 32 or 16 vector
    /// registers): at most 12 (6), as even as the blocks can be, so that the last block is not
    /// mostly padding (32 channels: 3 blocks of 11, not 12 + 12 + 8).
    fn block(self, cout: usize) -> usize {
        let most = match self {
            Isa::Avx512 => 12,
            Isa::Avx2 => 6,
        };
        let blocks = cout.div_ceil(most).max(1);
        cout.div_ceil(blocks).max(most / 2)
    }
}

/// A stride-1 convolution of one sample's `[cin, h, w]` into `[cout, oh, ow]`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub pad: usize,
}

impl Shape {
    pub fn oh(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.kh
    }
    pub fn ow(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.kw
    }
    fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }
    /// Padded row length: every slot's vector loads (`lanes + kw - 1` from its start) fit.
    fn wp(&self, isa: Isa) -> usize {
        let l = isa.lanes();
        (self.w + 2 * self.pad).max(self.ow().div_ceil(l) * l + self.kw - 1)
    }
    /// The padded input's length.
    pub fn padded_len(&self, isa: Isa) -> usize {
        self.cin * self.hp() * self.wp(isa) + isa.lanes()
    }
    /// Whether the kernel takes this shape: a window no larger than the padded input, padding
    /// smaller than the window.
    pub fn ok(&self) -> bool {
        self.kh <= self.h + 2 * self.pad
            && self.kw <= self.w + 2 * self.pad
            && self.pad < self.kh
            && self.pad < self.kw
            && self.cin > 0
            && self.cout > 0
    }
}

/// Which tile kernel a shape takes (a function of the shape and machine only, so that the
/// packing and the convolution agree; both kernels give the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// Vectors along output rows: [`tile512`], [`tile256`].
    Rows,
    /// Vectors along output channels, this many per block: [`tile_oc512`], [`tile_oc256`].
    Channels(usize),
}

/// Most output pixels per [`tile_oc512`] tile (with two vectors of channels: 28 of the 32
/// vector registers accumulate).
const PMAX: usize = 14;
/// Most output pixels per [`tile_oc256`] tile (12 of the 16 registers).
const PMAX256: usize = 6;

impl Isa {
    /// Most output pixels per tile along channels.
    fn pmax(self) -> usize {
        match self {
            Isa::Avx512 => PMAX,
            Isa::Avx2 => PMAX256,
        }
    }
}

/// The pixel tiles of an output row `ow` wide: `(first pixel, pixels)`, as few as fit
/// `pmax`, as even as they can be.
pub(super) fn row_tiles(ow: usize, pmax: usize) -> impl Iterator<Item = (usize, usize)> {
    let t = ow.div_ceil(pmax).max(1);
    (0..t).map(move |i| {
        let start = i * (ow / t) + i.min(ow % t);
        (start, ow / t + usize::from(i < ow % t))
    })
}

/// The kernel with the fewest estimated cycles. Along rows, every tap of a tile is `2 OB`
/// multiply-adds, padded lanes and channels included; along channels it is `P V`
/// multiply-adds, or `P + V` loads where those take longer, and each tile ends with a
/// transpose (about 160 multiply-add slots per 16 channels, 60 per 8). `REGIMEN_CONV_ROWS=1`
/// keeps every shape on rows (to compare the two).
fn kernel(s: &Shape, isa: Isa) -> Kernel {
    use std::sync::OnceLock;
    static ROWS: OnceLock<bool> = OnceLock::new();
    let forced = *ROWS.get_or_init(|| std::env::var("REGIMEN_CONV_ROWS").is_ok_and(|v| v == "1"));
    if forced {
        Kernel::Rows
    } else {
        choose(s, isa)
    }
}

/// [`kernel`]'s estimate.
fn choose(s: &Shape, isa: Isa) -> Kernel {
    let (oh, ow, l) = (s.oh(), s.ow(), isa.lanes());
    let taps = s.cin * s.kh * s.kw;
    let ob = isa.block(s.cout);
    let rows = oh * ow.div_ceil(l) * s.cout.div_ceil(ob) * ob * taps;
    let channels = |v: usize| {
        let blocks = s.cout.div_ceil(v * l);
        let transpose = match isa {
            Isa::Avx512 => 160,
            Isa::Avx2 => 60,
        };
        let per_row: usize = row_tiles(ow, isa.pmax())
            .map(|(_, p)| (p * v).max(p + v) * taps + transpose * v)
            .sum();
        oh * blocks * per_row
    };
    // On AVX2, a block's weights (two vectors of channels per tap) beyond 24 KiB no longer
    // share the 48 KiB first-level cache with the tile's input rows: measured on the Xeon with
    // the AVX2 kernels forced, 64 -> 64 channels at 14x14 ran 6% slower along channels, while
    // 32 -> 32 at 28x28 ran 18% faster.
    if isa == Isa::Avx2 && taps * 2 * isa.lanes() * 4 > 24 << 10 {
        return Kernel::Rows;
    }
    let (c1, c2) = (channels(1), channels(2));
    let (v, best) = if c2 <= c1 { (2, c2) } else { (1, c1) };
    if best * 100 < rows * 97 {
        Kernel::Channels(v)
    } else {
        Kernel::Rows
    }
}

impl Kernel {
    /// Output channels per packed block.
    fn block(self, s: &Shape, isa: Isa) -> usize {
        match self {
            Kernel::Rows => isa.block(s.cout),
            Kernel::Channels(v) => v * isa.lanes(),
        }
    }
}

/// Weights packed for the kernel: `w(o, i, ki, kj)` for output channel `o`, input channel `i`.
pub fn pack(s: &Shape, isa: Isa, w: impl Fn(usize, usize, usize, usize) -> f32) -> Vec<f32> {
    pack_for(s, isa, kernel(s, isa), w)
}

fn pack_for(
    s: &Shape,
    isa: Isa,
    kern: Kernel,
    w: impl Fn(usize, usize, usize, usize) -> f32,
) -> Vec<f32> {
    let ob = kern.block(s, isa);
    let blocks = s.cout.div_ceil(ob);
    let mut out = vec![0.0f32; blocks * s.cin * s.kh * s.kw * ob];
    let mut at = 0;
    for b in 0..blocks {
        for i in 0..s.cin {
            for ki in 0..s.kh {
                for kj in 0..s.kw {
                    for o in 0..ob {
                        let oc = b * ob + o;
                        if oc < s.cout {
                            out[at] = w(oc, i, ki, kj);
                        }
                        at += 1;
                    }
                }
            }
        }
    }
    out
}

/// Copy `x` (`[cin, h, w]`) into the inside of the padded buffer `xp`. Its padding is never
/// written: callers give a zeroed buffer and reuse it for the same shape (the copy is a pass
/// over memory that the kernel waits for; zeroing the whole buffer each time was another).
fn pad_input(s: &Shape, isa: Isa, x: &[f32], xp: &mut [f32]) {
    let (hp, wp, p) = (s.hp(), s.wp(isa), s.pad);
    for ci in 0..s.cin {
        for iy in 0..s.h {
            let dst = &mut xp[(ci * hp + iy + p) * wp + p..][..s.w];
            dst.copy_from_slice(&x[(ci * s.h + iy) * s.w..][..s.w]);
        }
    }
}

/// `y` (`[cout, oh, ow]`) = the convolution of `x` with the packed weights, plus `bias`.
/// `xp` is scratch of [`Shape::padded_len`], zeroed before its first use with this shape.
pub fn conv(
    s: &Shape,
    isa: Isa,
    x: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    xp: &mut [f32],
    y: &mut [f32],
) {
    conv_for(s, isa, kernel(s, isa), x, packed, bias, xp, y);
}

#[allow(clippy::too_many_arguments)]
fn conv_for(
    s: &Shape,
    isa: Isa,
    kern: Kernel,
    x: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    xp: &mut [f32],
    y: &mut [f32],
) {
    debug_assert!(s.ok());
    pad_input(s, isa, x, xp);
    let (oh, ow, lanes) = (s.oh(), s.ow(), isa.lanes());
    assert!(y.len() >= s.cout * oh * ow && xp.len() >= s.padded_len(isa));
    if let Kernel::Channels(v) = kern {
        conv_channels(s, isa, v, xp, packed, bias, y);
        return;
    }
    // The slots: (output row, first column), row-major; two per tile, the last one repeated
    // (unstored) when the count is odd.
    let segs = ow.div_ceil(lanes);
    let n_slots = oh * segs;
    let slot = |k: usize| (k / segs, (k % segs) * lanes);
    let ob = isa.block(s.cout);
    let wblock = s.cin * s.kh * s.kw * ob;
    let wp = s.wp(isa);
    let plane = s.hp() * wp;
    for (b, wb) in packed.chunks(wblock).enumerate() {
        let oc0 = b * ob;
        let n_oc = ob.min(s.cout - oc0);
        let mut bias_b = [0.0f32; 12];
        if let Some(bias) = bias {
            bias_b[..n_oc].copy_from_slice(&bias[oc0..oc0 + n_oc]);
        }
        for k in (0..n_slots).step_by(2) {
            let both = k + 1 < n_slots;
            let (a, bslot) = (slot(k), slot(if both { k + 1 } else { k }));
            let t = Tile {
                in0: a.0 * wp + a.1,
                in1: bslot.0 * wp + bslot.1,
                out0: a.0 * ow + a.1,
                out1: bslot.0 * ow + bslot.1,
                n0: (ow - a.1).min(lanes),
                n1: if both { (ow - bslot.1).min(lanes) } else { 0 },
            };
            // SAFETY: `isa` was detected on this machine; the loads stay inside `xp` (rows of
            // `wp` cover every slot's `lanes + kw - 1` reads, and `xp` has `lanes` spare at the
            // end); the stores write lanes below `n0`/`n1` of rows inside `y`.
            unsafe {
                let yb = y.as_mut_ptr().add(oc0 * oh * ow);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => TILE512[ob - 6](
                        s,
                        xp.as_ptr(),
                        plane,
                        wp,
                        wb.as_ptr(),
                        &bias_b,
                        n_oc,
                        yb,
                        oh * ow,
                        t,
                    ),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => TILE256[ob - 3](
                        s,
                        xp.as_ptr(),
                        plane,
                        wp,
                        wb.as_ptr(),
                        &bias_b,
                        n_oc,
                        yb,
                        oh * ow,
                        t,
                    ),
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!("no direct convolution off x86-64"),
                }
            }
        }
    }
}

/// The convolution with vectors along output channels: per block of `v` vectors of channels
/// and per tile of `P` pixels of one output row, `P v` accumulators; per tap, `v` weight
/// vectors and `P` broadcast inputs. Every lane is a real output channel (but the last
/// block's padding), whatever the row's width.
fn conv_channels(
    s: &Shape,
    isa: Isa,
    v: usize,
    xp: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (oh, ow, wp) = (s.oh(), s.ow(), s.wp(isa));
    let ob = v * isa.lanes();
    let plane = s.hp() * wp;
    let wblock = s.cin * s.kh * s.kw * ob;
    for (b, wb) in packed.chunks(wblock).enumerate() {
        let oc0 = b * ob;
        let n_oc = ob.min(s.cout - oc0);
        let mut bias_b = [0.0f32; 32];
        if let Some(bias) = bias {
            bias_b[..n_oc].copy_from_slice(&bias[oc0..oc0 + n_oc]);
        }
        for oy in 0..oh {
            for (ox0, p) in row_tiles(ow, isa.pmax()) {
                #[cfg(target_arch = "x86_64")]
                let f = match isa {
                    Isa::Avx512 => TILE_OC512[v - 1][p - 1],
                    Isa::Avx2 => TILE_OC256[v - 1][p - 1],
                };
                // SAFETY: `isa` was detected on this machine; the tile reads rows
                // `oy..oy + kh` and columns `ox0..ox0 + p + kw - 1` of each padded plane
                // (inside `xp`), the weights of this block, and writes `p` pixels of its `n_oc`
                // channels' row `oy` of `y` (checked above); the AVX2 tile writes 8 when
                // `ox0 + 8 <= ow`, the rest of them inside the row and written again by the
                // next tile.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    f(
                        s,
                        xp.as_ptr().add(oy * wp + ox0),
                        plane,
                        wp,
                        wb.as_ptr(),
                        &bias_b,
                        n_oc,
                        y.as_mut_ptr().add(oc0 * oh * ow + oy * ow + ox0),
                        oh * ow,
                        ox0 + 8 <= ow,
                    )
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("no direct convolution off x86-64: {p}")
            }
        }
    }
}

/// A tile kernel along channels: see [`tile_oc512`].
#[cfg(target_arch = "x86_64")]
type OcFn = unsafe fn(
    &Shape,
    *const f32,
    usize,
    usize,
    *const f32,
    &[f32; 32],
    usize,
    *mut f32,
    usize,
    bool,
);

macro_rules! oc_tiles {
    ($v:literal) => {
        [
            tile_oc512::<$v, 1>,
            tile_oc512::<$v, 2>,
            tile_oc512::<$v, 3>,
            tile_oc512::<$v, 4>,
            tile_oc512::<$v, 5>,
            tile_oc512::<$v, 6>,
            tile_oc512::<$v, 7>,
            tile_oc512::<$v, 8>,
            tile_oc512::<$v, 9>,
            tile_oc512::<$v, 10>,
            tile_oc512::<$v, 11>,
            tile_oc512::<$v, 12>,
            tile_oc512::<$v, 13>,
            tile_oc512::<$v, 14>,
        ]
    };
}

/// [`tile_oc512`] for one and two vectors of channels and 1 to [`PMAX`] pixels.
#[cfg(target_arch = "x86_64")]
const TILE_OC512: [[OcFn; PMAX]; 2] = [oc_tiles!(1), oc_tiles!(2)];

/// [`tile_oc256`] for one and two vectors of channels and 1 to [`PMAX256`] pixels.
#[cfg(target_arch = "x86_64")]
const TILE_OC256: [[OcFn; PMAX256]; 2] = [
    [
        tile_oc256::<1, 1>,
        tile_oc256::<1, 2>,
        tile_oc256::<1, 3>,
        tile_oc256::<1, 4>,
        tile_oc256::<1, 5>,
        tile_oc256::<1, 6>,
    ],
    [
        tile_oc256::<2, 1>,
        tile_oc256::<2, 2>,
        tile_oc256::<2, 3>,
        tile_oc256::<2, 4>,
        tile_oc256::<2, 5>,
        tile_oc256::<2, 6>,
    ],
];

/// One tile along channels: `V` vectors of 16 output channels x `P` pixels of one row. `x`
/// points at the tile's first input (channel 0, its row and column in the padded plane), `y` at
/// its first output (block's first channel). Each output is the same chain of multiply-adds as
/// in [`tile512`]: the bias, then `w x` for every input channel, window row and column in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_oc512<const V: usize, const P: usize>(
    s: &Shape,
    x: *const f32,
    plane: usize,
    wp: usize,
    w: *const f32,
    bias: &[f32; 32],
    n_oc: usize,
    y: *mut f32,
    ystride: usize,
    _whole: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; P];
    for v in 0..V {
        let b = _mm512_loadu_ps(bias.as_ptr().add(16 * v));
        for a in acc.iter_mut() {
            a[v] = b;
        }
    }
    let mut wptr = w;
    for ci in 0..s.cin {
        for ki in 0..s.kh {
            let r = x.add(ci * plane + ki * wp);
            for kj in 0..s.kw {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_ps(wptr.add(16 * v));
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*r.add(p + kj));
                    for v in 0..V {
                        a[v] = _mm512_fmadd_ps(wv[v], xb, a[v]);
                    }
                }
                wptr = wptr.add(16 * V);
            }
        }
    }
    // Rows of pixels -> rows of channels, 16 channels at a time.
    let m: __mmask16 = ((1u32 << P) - 1) as __mmask16;
    for v in 0..V {
        let mut t = [_mm512_setzero_ps(); 16];
        for (p, a) in acc.iter().enumerate() {
            t[p] = a[v];
        }
        let t = transpose16(t);
        for (o, row) in t
            .iter()
            .enumerate()
            .take(n_oc.saturating_sub(16 * v).min(16))
        {
            _mm512_mask_storeu_ps(y.add((16 * v + o) * ystride), m, *row);
        }
    }
}

/// One tile along channels on AVX2: `V` vectors of 8 output channels x `P` pixels, as
/// [`tile_oc512`]. With `whole`, the row has 8 pixels from the tile's first: their stores are
/// whole vectors (masked stores are slow on some AVX2 machines), the pixels past `P` belong to
/// the next tile, which writes them again.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_oc256<const V: usize, const P: usize>(
    s: &Shape,
    x: *const f32,
    plane: usize,
    wp: usize,
    w: *const f32,
    bias: &[f32; 32],
    n_oc: usize,
    y: *mut f32,
    ystride: usize,
    whole: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; P];
    for v in 0..V {
        let b = _mm256_loadu_ps(bias.as_ptr().add(8 * v));
        for a in acc.iter_mut() {
            a[v] = b;
        }
    }
    let mut wptr = w;
    for ci in 0..s.cin {
        for ki in 0..s.kh {
            let r = x.add(ci * plane + ki * wp);
            for kj in 0..s.kw {
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm256_loadu_ps(wptr.add(8 * v));
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    let xb = _mm256_set1_ps(*r.add(p + kj));
                    for v in 0..V {
                        a[v] = _mm256_fmadd_ps(wv[v], xb, a[v]);
                    }
                }
                wptr = wptr.add(8 * V);
            }
        }
    }
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(P as i32), lane);
    // The accumulators leave their registers here, read by variable indices below: a copy
    // (indexing `acc` itself would keep it in memory through the loop above).
    let fin = std::hint::black_box(acc);
    for v in 0..V {
        let mut t = [_mm256_setzero_ps(); 8];
        for (p, a) in fin.iter().enumerate() {
            t[p] = a[v];
        }
        let t = transpose8(t);
        for (o, row) in t.iter().enumerate().take(n_oc.saturating_sub(8 * v).min(8)) {
            let at = y.add((8 * v + o) * ystride);
            if whole {
                _mm256_storeu_ps(at, *row);
            } else {
                _mm256_maskstore_ps(at, m, *row);
            }
        }
    }
}

/// The transpose of an 8 x 8 matrix held as 8 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let mut a = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm256_setzero_ps(); 8];
    for i in 0..2 {
        let (j, k) = (4 * i, 4 * i + 2);
        b[4 * i] = _mm256_shuffle_ps::<0x44>(a[j], a[k]);
        b[4 * i + 1] = _mm256_shuffle_ps::<0xEE>(a[j], a[k]);
        b[4 * i + 2] = _mm256_shuffle_ps::<0x44>(a[j + 1], a[k + 1]);
        b[4 * i + 3] = _mm256_shuffle_ps::<0xEE>(a[j + 1], a[k + 1]);
    }
    let mut d = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        d[i] = _mm256_permute2f128_ps::<0x20>(b[i], b[4 + i]);
        d[4 + i] = _mm256_permute2f128_ps::<0x31>(b[i], b[4 + i]);
    }
    d
}

/// The transpose of a 16 x 16 matrix held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved, then pairs of pairs, then 128-bit lanes in two steps.
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let (j, k) = (4 * i, 4 * i + 2);
        b[4 * i] = _mm512_shuffle_ps::<0x44>(a[j], a[k]);
        b[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a[j], a[k]);
        b[4 * i + 2] = _mm512_shuffle_ps::<0x44>(a[j + 1], a[k + 1]);
        b[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(a[j + 1], a[k + 1]);
    }
    let mut c = [_mm512_setzero_ps(); 16];
    for h in 0..2 {
        for i in 0..4 {
            c[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(b[8 * h + i], b[8 * h + 4 + i]);
            c[8 * h + 4 + i] = _mm512_shuffle_f32x4::<0xDD>(b[8 * h + i], b[8 * h + 4 + i]);
        }
    }
    let mut d = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        d[i] = _mm512_shuffle_f32x4::<0x88>(c[i], c[8 + i]);
        d[8 + i] = _mm512_shuffle_f32x4::<0xDD>(c[i], c[8 + i]);
    }
    d
}

/// Where a tile reads and writes: offsets of its two slots in a padded input plane and in an
/// output plane, and their valid lanes.
#[derive(Clone, Copy)]
struct Tile {
    in0: usize,
    in1: usize,
    out0: usize,
    out1: usize,
    n0: usize,
    n1: usize,
}

/// A tile kernel: see [`tile512`].
#[cfg(target_arch = "x86_64")]
type TileFn = unsafe fn(
    &Shape,
    *const f32,
    usize,
    usize,
    *const f32,
    &[f32; 12],
    usize,
    *mut f32,
    usize,
    Tile,
);

/// [`tile512`] for 6 to 12 output channels per block.
#[cfg(target_arch = "x86_64")]
const TILE512: [TileFn; 7] = [
    tile512::<6>,
    tile512::<7>,
    tile512::<8>,
    tile512::<9>,
    tile512::<10>,
    tile512::<11>,
    tile512::<12>,
];

/// [`tile256`] for 3 to 6 output channels per block.
#[cfg(target_arch = "x86_64")]
const TILE256: [TileFn; 4] = [tile256::<3>, tile256::<4>, tile256::<5>, tile256::<6>];

/// One tile: `OB` output channels of two slots of 16 output pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile512<const OB: usize>(
    s: &Shape,
    xp: *const f32,
    plane: usize,
    wp: usize,
    w: *const f32,
    bias: &[f32; 12],
    n_oc: usize,
    y: *mut f32,
    ystride: usize,
    t: Tile,
) {
    let mut a0 = [_mm512_setzero_ps(); OB];
    let mut a1 = [_mm512_setzero_ps(); OB];
    for o in 0..OB {
        a0[o] = _mm512_set1_ps(bias[o]);
        a1[o] = a0[o];
    }
    let mut wptr = w;
    for ci in 0..s.cin {
        let base = xp.add(ci * plane);
        for ki in 0..s.kh {
            let r0 = base.add(t.in0 + ki * wp);
            let r1 = base.add(t.in1 + ki * wp);
            for kj in 0..s.kw {
                let x0 = _mm512_loadu_ps(r0.add(kj));
                let x1 = _mm512_loadu_ps(r1.add(kj));
                for o in 0..OB {
                    let wv = _mm512_set1_ps(*wptr.add(o));
                    a0[o] = _mm512_fmadd_ps(wv, x0, a0[o]);
                    a1[o] = _mm512_fmadd_ps(wv, x1, a1[o]);
                }
                wptr = wptr.add(OB);
            }
        }
    }
    let m0: __mmask16 = ((1u32 << t.n0) - 1) as __mmask16;
    let m1: __mmask16 = ((1u32 << t.n1) - 1) as __mmask16;
    for o in 0..n_oc {
        let yo = y.add(o * ystride);
        _mm512_mask_storeu_ps(yo.add(t.out0), m0, a0[o]);
        if t.n1 > 0 {
            _mm512_mask_storeu_ps(yo.add(t.out1), m1, a1[o]);
        }
    }
}

/// One tile: `OB` output channels of two slots of 8 output pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile256<const OB: usize>(
    s: &Shape,
    xp: *const f32,
    plane: usize,
    wp: usize,
    w: *const f32,
    bias: &[f32; 12],
    n_oc: usize,
    y: *mut f32,
    ystride: usize,
    t: Tile,
) {
    let mut a0 = [_mm256_setzero_ps(); OB];
    let mut a1 = [_mm256_setzero_ps(); OB];
    for o in 0..OB {
        a0[o] = _mm256_set1_ps(bias[o]);
        a1[o] = a0[o];
    }
    let mut wptr = w;
    for ci in 0..s.cin {
        let base = xp.add(ci * plane);
        for ki in 0..s.kh {
            let r0 = base.add(t.in0 + ki * wp);
            let r1 = base.add(t.in1 + ki * wp);
            for kj in 0..s.kw {
                let x0 = _mm256_loadu_ps(r0.add(kj));
                let x1 = _mm256_loadu_ps(r1.add(kj));
                for o in 0..OB {
                    let wv = _mm256_set1_ps(*wptr.add(o));
                    a0[o] = _mm256_fmadd_ps(wv, x0, a0[o]);
                    a1[o] = _mm256_fmadd_ps(wv, x1, a1[o]);
                }
                wptr = wptr.add(OB);
            }
        }
    }
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.n0 as i32), lane);
    let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.n1 as i32), lane);
    for o in 0..n_oc {
        let yo = y.add(o * ystride);
        _mm256_maskstore_ps(yo.add(t.out0), m0, a0[o]);
        if t.n1 > 0 {
            _mm256_maskstore_ps(yo.add(t.out1), m1, a1[o]);
        }
    }
}

/// The weight gradient of a stride-1 3x3 convolution over a group of samples, without a column
/// matrix: `dw[o, i, ki, kj] += sum over samples and output pixels of
/// dy[o, oy, ox] * xpad[i, oy + ki, ox + kj]`. `xs` and `dys` are the group's samples
/// (`[cin, h, w]` and `[cout, oh, ow]` each); `xp` is scratch of `xs.len()` padded inputs,
/// zeroed before its first use with this shape.
/// Each `(o, i)` accumulates in vector lanes over the whole group, then is reduced once, in a
/// fixed order.
pub fn weight_grad_3x3(
    s: &Shape,
    isa: Isa,
    xs: &[&[f32]],
    dys: &[&[f32]],
    xp: &mut [f32],
    dw: &mut [f32],
) {
    assert!(s.kh == 3 && s.kw == 3 && s.ok());
    let one = s.padded_len(isa);
    assert!(xp.len() >= one * xs.len() && dw.len() >= s.cout * s.cin * 9);
    for (x, buf) in xs.iter().zip(xp.chunks_mut(one)) {
        pad_input(s, isa, x, buf);
    }
    let (oh, ow, wp) = (s.oh(), s.ow(), s.wp(isa));
    let plane = s.hp() * wp;
    let ob = match isa {
        Isa::Avx512 => 3,
        Isa::Avx2 => 1,
    };
    // Per-sample plane pointers, reused across blocks and channels.
    let (mut dy_at, mut x_at) = (Vec::with_capacity(dys.len()), Vec::with_capacity(xs.len()));
    for oc0 in (0..s.cout).step_by(ob) {
        let n_oc = ob.min(s.cout - oc0);
        dy_at.clear();
        dy_at.extend(dys.iter().map(|dy| dy[oc0 * oh * ow..].as_ptr()));
        for ci in 0..s.cin {
            let mut sums = [0.0f32; 27];
            x_at.clear();
            x_at.extend(
                xp.chunks(one)
                    .take(xs.len())
                    .map(|xpad| xpad[ci * plane..].as_ptr()),
            );
            let g = WgTask {
                x: &x_at,
                dy: &dy_at,
                n_oc,
                oh,
                ow,
                wp,
            };
            // SAFETY: `isa` was detected; loads are masked to the valid columns of rows inside
            // each padded plane and of the `n_oc` gradient planes.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => wg512(g, &mut sums),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => wg256(g, &mut sums),
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!("no direct convolution off x86-64"),
                }
            }
            for o in 0..n_oc {
                let at = ((oc0 + o) * s.cin + ci) * 9;
                for t in 0..9 {
                    dw[at + t] += sums[o * 9 + t];
                }
            }
        }
    }
}

/// A weight-gradient block over a group of samples: per sample, the padded input plane of one
/// channel and the first of `n_oc` output-gradient planes.
#[derive(Clone, Copy)]
struct WgTask<'a> {
    x: &'a [*const f32],
    dy: &'a [*const f32],
    n_oc: usize,
    oh: usize,
    ow: usize,
    wp: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wg512(g: WgTask, sums: &mut [f32; 27]) {
    let mut acc = [_mm512_setzero_ps(); 27];
    let zero = _mm512_setzero_ps();
    let planes = g.oh * g.ow;
    for (&x, &dy) in g.x.iter().zip(g.dy) {
        for oy in 0..g.oh {
            for ox0 in (0..g.ow).step_by(16) {
                let m: __mmask16 = ((1u32 << (g.ow - ox0).min(16)) - 1) as __mmask16;
                let at = oy * g.ow + ox0;
                let d0 = _mm512_maskz_loadu_ps(m, dy.add(at));
                let d1 = if g.n_oc > 1 {
                    _mm512_maskz_loadu_ps(m, dy.add(planes + at))
                } else {
                    zero
                };
                let d2 = if g.n_oc > 2 {
                    _mm512_maskz_loadu_ps(m, dy.add(2 * planes + at))
                } else {
                    zero
                };
                for ki in 0..3 {
                    let row = x.add((oy + ki) * g.wp + ox0);
                    for kj in 0..3 {
                        let xv = _mm512_maskz_loadu_ps(m, row.add(kj));
                        let t = ki * 3 + kj;
                        acc[t] = _mm512_fmadd_ps(d0, xv, acc[t]);
                        acc[9 + t] = _mm512_fmadd_ps(d1, xv, acc[9 + t]);
                        acc[18 + t] = _mm512_fmadd_ps(d2, xv, acc[18 + t]);
                    }
                }
            }
        }
    }
    for (s, a) in sums.iter_mut().zip(acc) {
        *s += _mm512_reduce_add_ps(a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wg256(g: WgTask, sums: &mut [f32; 27]) {
    let mut acc = [_mm256_setzero_ps(); 9];
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (&x, &dy) in g.x.iter().zip(g.dy) {
        for oy in 0..g.oh {
            for ox0 in (0..g.ow).step_by(8) {
                let m = _mm256_cmpgt_epi32(_mm256_set1_epi32((g.ow - ox0).min(8) as i32), lane);
                let d = _mm256_maskload_ps(dy.add(oy * g.ow + ox0), m);
                for ki in 0..3 {
                    let row = x.add((oy + ki) * g.wp + ox0);
                    for kj in 0..3 {
                        let xv = _mm256_maskload_ps(row.add(kj), m);
                        acc[ki * 3 + kj] = _mm256_fmadd_ps(d, xv, acc[ki * 3 + kj]);
                    }
                }
            }
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        // Lanes added in a fixed order.
        let mut v = [0.0f32; 8];
        _mm256_storeu_ps(v.as_mut_ptr(), a);
        sums[t] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
}

/// Row stride of [`weight_grad_oc`]'s accumulator and transposed gradient: `cout` rounded up
/// to whole vectors.
pub fn oc_stride(isa: Isa, cout: usize) -> usize {
    cout.div_ceil(isa.lanes()) * isa.lanes()
}

/// Length of [`weight_grad_oc`]'s transposed-gradient scratch.
pub fn dy_t_len(s: &Shape, isa: Isa) -> usize {
    s.oh() * s.ow() * oc_stride(isa, s.cout)
}

/// `dyt[p, o] = dy[o, p]` for `cout` channels and `pixels` pixels (rows of `dyt` are `ocp`
/// long; the channels from `cout` to `ocp` are written as zeros). Whole blocks of a vector's
/// width of pixels x channels go through a transpose in registers; the pixels after the last
/// whole block are copied one by one (it was all one by one: 3% of cnn-step).
pub(super) fn transpose_dy(
    isa: Isa,
    dy: &[f32],
    cout: usize,
    pixels: usize,
    dyt: &mut [f32],
    ocp: usize,
) {
    assert!(
        dy.len() >= cout * pixels && dyt.len() >= pixels * ocp && ocp.is_multiple_of(isa.lanes())
    );
    let l = isa.lanes();
    let whole = pixels / l * l;
    // SAFETY: the features were detected on this machine; block (p0, o0) reads `l` pixels from
    // `p0` of channels `o0..min(o0 + l, cout)` (inside `dy`) and writes `l` channels from `o0`
    // (`o0 + l <= ocp`) of pixels `p0..p0 + l <= pixels` (inside `dyt`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match isa {
            Isa::Avx512 => transpose_blocks512(dy, cout, pixels, whole, dyt, ocp),
            Isa::Avx2 => transpose_blocks256(dy, cout, pixels, whole, dyt, ocp),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let whole = 0;
    for p in whole..pixels {
        let row = &mut dyt[p * ocp..(p + 1) * ocp];
        for (o, t) in row.iter_mut().enumerate() {
            *t = if o < cout { dy[o * pixels + p] } else { 0.0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_blocks512(
    dy: &[f32],
    cout: usize,
    pixels: usize,
    whole: usize,
    dyt: &mut [f32],
    ocp: usize,
) {
    let (src, dst) = (dy.as_ptr(), dyt.as_mut_ptr());
    for p0 in (0..whole).step_by(16) {
        for o0 in (0..ocp).step_by(16) {
            let rows: [__m512; 16] = std::array::from_fn(|k| {
                if o0 + k < cout {
                    _mm512_loadu_ps(src.add((o0 + k) * pixels + p0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (j, t) in transpose16(rows).iter().enumerate() {
                _mm512_storeu_ps(dst.add((p0 + j) * ocp + o0), *t);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_blocks256(
    dy: &[f32],
    cout: usize,
    pixels: usize,
    whole: usize,
    dyt: &mut [f32],
    ocp: usize,
) {
    let (src, dst) = (dy.as_ptr(), dyt.as_mut_ptr());
    for p0 in (0..whole).step_by(8) {
        for o0 in (0..ocp).step_by(8) {
            let rows: [__m256; 8] = std::array::from_fn(|k| {
                if o0 + k < cout {
                    _mm256_loadu_ps(src.add((o0 + k) * pixels + p0))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (j, t) in transpose8(rows).iter().enumerate() {
                _mm256_storeu_ps(dst.add((p0 + j) * ocp + o0), *t);
            }
        }
    }
}

/// One sample's weight gradient of a stride-1 convolution with a window 3 wide, vectors along
/// output channels: `acc[(i kh + ki) 3 + kj, o] += sum over output pixels of
/// xpad[i, oy + ki, ox + kj] * dy[o, oy, ox]` (the transposed weight gradient, rows of
/// [`oc_stride`]). `dy` is first transposed to `[pixel, channel]` (in `dyt`, zeroed before its
/// first use with this shape: the padding channels stay zero), the input copied into the padded
/// buffer `xp` (as for [`conv`]). The kernel then holds a block of taps x output channels in
/// registers and, per output pixel, loads one row of output-channel gradients and broadcasts
/// the input under each tap: no column matrix, no packing, every lane busy (the older
/// [`weight_grad_3x3`] vectorizes along pixels, masked at the row ends).
///
/// Each accumulator element is one chain of fused multiply-adds over the output pixels in
/// order, the same on both instruction sets, so the bits do not depend on the machine.
pub fn weight_grad_oc(
    s: &Shape,
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    xp: &mut [f32],
    dyt: &mut [f32],
    acc: &mut [f32],
) {
    assert!(s.kw == 3 && s.ok());
    let (oh, ow, wp, lanes) = (s.oh(), s.ow(), s.wp(isa), isa.lanes());
    let ocp = oc_stride(isa, s.cout);
    let pixels = oh * ow;
    assert!(
        x.len() >= s.cin * s.h * s.w
            && dy.len() >= s.cout * pixels
            && xp.len() >= s.padded_len(isa)
            && dyt.len() >= pixels * ocp
            && acc.len() >= s.cin * s.kh * 3 * ocp
    );
    pad_input(s, isa, x, xp);
    transpose_dy(isa, dy, s.cout, pixels, dyt, ocp);
    // Rows of output pixels per block: their gradients (`rows ow ocp` floats) stay in L1 while
    // every input channel passes over them.
    let rows = (4096 / (ow * ocp)).clamp(1, oh);
    let plane = s.hp() * wp;
    let most_rk = match isa {
        Isa::Avx512 => 3,
        Isa::Avx2 => 2,
    };
    for oy0 in (0..oh).step_by(rows) {
        let n_rows = rows.min(oh - oy0);
        for ci in 0..s.cin {
            let mut c0 = 0;
            while c0 < ocp {
                let v = if ocp - c0 >= 2 * lanes { 2 } else { 1 };
                let mut ki0 = 0;
                while ki0 < s.kh {
                    let rk = most_rk.min(s.kh - ki0);
                    let t = WoTask {
                        x: xp[ci * plane + (oy0 + ki0) * wp..].as_ptr(),
                        wp,
                        dy: dyt[oy0 * ow * ocp + c0..].as_ptr(),
                        ocp,
                        rows: n_rows,
                        ow,
                        acc: acc[(ci * s.kh + ki0) * 3 * ocp + c0..].as_mut_ptr(),
                    };
                    // SAFETY: `isa` was detected; the task reads rows `oy0 + ki0 ..
                    // oy0 + ki0 + n_rows + rk - 1 < hp` of the channel's padded plane, columns
                    // below `ow + 2 <= wp`; `v` vectors from column `c0` of rows of `dyt` and
                    // `acc` (`c0 + v lanes <= ocp`); the lengths were checked above.
                    unsafe {
                        match (isa, rk, v) {
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, 3, 2) => wo512::<3, 2>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, 3, _) => wo512::<3, 1>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, 2, 2) => wo512::<2, 2>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, 2, _) => wo512::<2, 1>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, _, 2) => wo512::<1, 2>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx512, _, _) => wo512::<1, 1>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx2, 2, 2) => wo256::<2, 2>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx2, 2, _) => wo256::<2, 1>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx2, _, 2) => wo256::<1, 2>(t),
                            #[cfg(target_arch = "x86_64")]
                            (Isa::Avx2, _, _) => wo256::<1, 1>(t),
                            #[cfg(not(target_arch = "x86_64"))]
                            _ => unreachable!("no direct convolution off x86-64"),
                        }
                    }
                    ki0 += rk;
                }
                c0 += v * lanes;
            }
        }
    }
}

/// A block of [`weight_grad_oc`]: `RK` window rows x 3 taps x `V` vectors of output channels,
/// over `rows` output rows.
#[derive(Clone, Copy)]
struct WoTask {
    /// The padded input plane at the block's first row and the window's first row.
    x: *const f32,
    wp: usize,
    /// The transposed gradient at the block's first pixel and first channel.
    dy: *const f32,
    ocp: usize,
    rows: usize,
    ow: usize,
    /// The accumulator at the first tap's row and first channel.
    acc: *mut f32,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wo512<const RK: usize, const V: usize>(t: WoTask) {
    let mut a = [[[_mm512_setzero_ps(); V]; 3]; RK];
    for (kr, ar) in a.iter_mut().enumerate() {
        for (kj, av) in ar.iter_mut().enumerate() {
            for (v, x) in av.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(t.acc.add((kr * 3 + kj) * t.ocp + v * 16));
            }
        }
    }
    for r in 0..t.rows {
        let drow = t.dy.add(r * t.ow * t.ocp);
        let xrow = t.x.add(r * t.wp);
        for ox in 0..t.ow {
            let mut d = [_mm512_setzero_ps(); V];
            for (v, dv) in d.iter_mut().enumerate() {
                *dv = _mm512_loadu_ps(drow.add(ox * t.ocp + v * 16));
            }
            for (kr, ar) in a.iter_mut().enumerate() {
                let xr = xrow.add(kr * t.wp + ox);
                for (kj, av) in ar.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*xr.add(kj));
                    for (x, &dv) in av.iter_mut().zip(&d) {
                        *x = _mm512_fmadd_ps(b, dv, *x);
                    }
                }
            }
        }
    }
    for (kr, ar) in a.iter().enumerate() {
        for (kj, av) in ar.iter().enumerate() {
            for (v, &x) in av.iter().enumerate() {
                _mm512_storeu_ps(t.acc.add((kr * 3 + kj) * t.ocp + v * 16), x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wo256<const RK: usize, const V: usize>(t: WoTask) {
    let mut a = [[[_mm256_setzero_ps(); V]; 3]; RK];
    for (kr, ar) in a.iter_mut().enumerate() {
        for (kj, av) in ar.iter_mut().enumerate() {
            for (v, x) in av.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(t.acc.add((kr * 3 + kj) * t.ocp + v * 8));
            }
        }
    }
    for r in 0..t.rows {
        let drow = t.dy.add(r * t.ow * t.ocp);
        let xrow = t.x.add(r * t.wp);
        for ox in 0..t.ow {
            let mut d = [_mm256_setzero_ps(); V];
            for (v, dv) in d.iter_mut().enumerate() {
                *dv = _mm256_loadu_ps(drow.add(ox * t.ocp + v * 8));
            }
            for (kr, ar) in a.iter_mut().enumerate() {
                let xr = xrow.add(kr * t.wp + ox);
                for (kj, av) in ar.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*xr.add(kj));
                    for (x, &dv) in av.iter_mut().zip(&d) {
                        *x = _mm256_fmadd_ps(b, dv, *x);
                    }
                }
            }
        }
    }
    for (kr, ar) in a.iter().enumerate() {
        for (kj, av) in ar.iter().enumerate() {
            for (v, &x) in av.iter().enumerate() {
                _mm256_storeu_ps(t.acc.add((kr * 3 + kj) * t.ocp + v * 8), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instruction sets this machine runs.
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

    /// The definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(s: &Shape, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let (oh, ow) = (s.oh(), s.ow());
        let mut y = vec![0.0f32; s.cout * oh * ow];
        for o in 0..s.cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[o] as f64;
                    for i in 0..s.cin {
                        for ki in 0..s.kh {
                            for kj in 0..s.kw {
                                let iy = (oy + ki) as isize - s.pad as isize;
                                let ix = (ox + kj) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                acc += w[((o * s.cin + i) * s.kh + ki) * s.kw + kj] as f64
                                    * x[(i * s.h + iy as usize) * s.w + ix as usize] as f64;
                            }
                        }
                    }
                    y[(o * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
        y
    }

    #[test]
    fn equals_the_definition_on_every_isa_and_shape() {
        let isas = isas();
        let mut r = crate::Rng::new(3);
        for &(cin, h, w, cout, k, pad) in &[
            (1, 28, 28, 32, 3, 1),
            (3, 14, 14, 13, 3, 1),
            (5, 7, 9, 25, 3, 0),
            (2, 5, 33, 7, 5, 2),
            (4, 3, 3, 1, 3, 2),
            (2, 17, 5, 12, 1, 0),
        ] {
            let s = Shape {
                cin,
                h,
                w,
                cout,
                kh: k,
                kw: k,
                pad,
            };
            let x: Vec<f32> = (0..cin * h * w).map(|_| r.normal() as f32).collect();
            let wt: Vec<f32> = (0..cout * cin * k * k).map(|_| r.normal() as f32).collect();
            let b: Vec<f32> = (0..cout).map(|_| r.normal() as f32).collect();
            let want = naive(&s, &x, &wt, &b);
            for &isa in &isas {
                let packed = pack(&s, isa, |o, i, ki, kj| {
                    wt[((o * cin + i) * k + ki) * k + kj]
                });
                // A zeroed buffer, reused: a first input of NaNs must leave no trace.
                let mut xp = vec![0.0; s.padded_len(isa)];
                // Sentinels after the output: a store past the end would change them.
                let n = cout * s.oh() * s.ow();
                let mut y = vec![7.0f32; n + 64];
                let nans = vec![f32::NAN; x.len()];
                conv(&s, isa, &nans, &packed, Some(&b), &mut xp, &mut y);
                y[..n].fill(7.0);
                conv(&s, isa, &x, &packed, Some(&b), &mut xp, &mut y);
                for (i, (g, w)) in y[..n].iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {s:?} at {i}: {g} vs {w}"
                    );
                }
                assert!(
                    y[n..].iter().all(|&v| v == 7.0),
                    "{isa:?} {s:?}: wrote past the end"
                );
            }
        }
    }

    /// Shapes at the edges of the kernels' tiles and blocks, on every instruction set and
    /// through both kernels (rows, and along channels with one and two vectors): non-square
    /// windows, one-pixel rows and planes (tiles of 1 to 3 pixels along channels), output
    /// channel counts around the 8- and 16-channel blocks, padding up to the window's limit.
    #[test]
    fn edge_shapes_equal_the_definition_through_every_kernel() {
        let isas = isas();
        let mut r = crate::Rng::new(11);
        // (cin, h, w, cout, kh, kw, pad)
        for &(cin, h, w, cout, kh, kw, pad) in &[
            (5, 6, 7, 17, 1, 3, 0),
            (5, 6, 7, 17, 3, 1, 0),
            (3, 7, 9, 13, 2, 3, 1),
            (4, 9, 8, 6, 5, 3, 2),
            (3, 14, 14, 8, 3, 3, 1),
            (3, 14, 14, 15, 3, 3, 1),
            (3, 14, 14, 16, 3, 3, 1),
            (4, 1, 1, 7, 3, 3, 1),
            (4, 1, 9, 7, 3, 3, 1),
            (32, 1, 1, 17, 3, 3, 1),
            (17, 2, 2, 7, 3, 3, 1),
            (7, 2, 2, 17, 3, 3, 1),
            (20, 3, 3, 33, 3, 3, 1),
            (6, 4, 1, 20, 3, 3, 1),
        ] {
            let s = Shape {
                cin,
                h,
                w,
                cout,
                kh,
                kw,
                pad,
            };
            assert!(s.ok(), "{s:?}");
            let x: Vec<f32> = (0..cin * h * w).map(|_| r.normal() as f32).collect();
            let wt: Vec<f32> = (0..cout * cin * kh * kw)
                .map(|_| r.normal() as f32)
                .collect();
            let b: Vec<f32> = (0..cout).map(|_| r.normal() as f32).collect();
            let want = naive(&s, &x, &wt, &b);
            let n = cout * s.oh() * s.ow();
            for &isa in &isas {
                for kern in [Kernel::Rows, Kernel::Channels(1), Kernel::Channels(2)] {
                    let packed = pack_for(&s, isa, kern, |o, i, ki, kj| {
                        wt[((o * cin + i) * kh + ki) * kw + kj]
                    });
                    let mut xp = vec![0.0; s.padded_len(isa)];
                    let mut y = vec![7.0f32; n + 64];
                    conv_for(&s, isa, kern, &x, &packed, Some(&b), &mut xp, &mut y);
                    for (i, (g, w)) in y[..n].iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{isa:?} {kern:?} {s:?} at {i}: {g} vs {w}"
                        );
                    }
                    assert!(
                        y[n..].iter().all(|&v| v == 7.0),
                        "{isa:?} {kern:?} {s:?}: wrote past the end"
                    );
                }
            }
        }
    }

    #[test]
    fn the_kernel_along_channels_gives_the_bits_of_the_one_along_rows() {
        let isas = isas();
        for isa in isas {
            along_channels(isa);
        }
    }

    fn along_channels(isa: Isa) {
        // The network's shapes take it.
        let sq = |c, h, o| Shape {
            cin: c,
            h,
            w: h,
            cout: o,
            kh: 3,
            kw: 3,
            pad: 1,
        };
        assert_eq!(choose(&sq(32, 28, 32), isa), Kernel::Channels(2));
        let wide = if isa == Isa::Avx512 {
            Kernel::Channels(2)
        } else {
            Kernel::Rows
        };
        assert_eq!(choose(&sq(64, 14, 64), isa), wide);
        assert_eq!(choose(&sq(1, 28, 32), isa), Kernel::Rows);
        let mut r = crate::Rng::new(4);
        // (cin, h, w, cout, k, pad): channels padded within a vector and within a block, rows
        // of 1 to 3 tiles of up to 14 (33 wide: 11 + 11 + 11; 30 wide: 10 x 3; 15: 8 + 7) and
        // of 1 to 6 tiles of up to 6 (13 wide: 5 + 4 + 4, each tile's whole vector written
        // over by the next; 28: 6 + 6 + 6 + 5 + 5; 7: 4 + 3), windows 1 to 5.
        for &(cin, h, w, cout, k, pad) in &[
            (32, 28, 28, 32, 3, 1),
            (6, 14, 14, 20, 3, 1),
            (5, 7, 9, 25, 3, 0),
            (2, 5, 33, 7, 5, 2),
            (4, 3, 3, 1, 3, 2),
            (3, 9, 30, 40, 3, 1),
            (7, 4, 15, 33, 3, 1),
            (2, 17, 5, 12, 1, 0),
            (9, 6, 13, 10, 3, 1),
            (6, 5, 7, 17, 3, 1),
            (3, 4, 16, 20, 3, 1),
        ] {
            let s = Shape {
                cin,
                h,
                w,
                cout,
                kh: k,
                kw: k,
                pad,
            };
            let x: Vec<f32> = (0..cin * h * w).map(|_| r.normal() as f32).collect();
            let wt: Vec<f32> = (0..cout * cin * k * k).map(|_| r.normal() as f32).collect();
            let b: Vec<f32> = (0..cout).map(|_| r.normal() as f32).collect();
            let n = cout * s.oh() * s.ow();
            let run = |kern| {
                let packed = pack_for(&s, isa, kern, |o, i, ki, kj| {
                    wt[((o * cin + i) * k + ki) * k + kj]
                });
                let mut xp = vec![0.0; s.padded_len(isa)];
                let mut y = vec![7.0f32; n + 64];
                let nans = vec![f32::NAN; x.len()];
                conv_for(&s, isa, kern, &nans, &packed, Some(&b), &mut xp, &mut y);
                y[..n].fill(7.0);
                conv_for(&s, isa, kern, &x, &packed, Some(&b), &mut xp, &mut y);
                assert!(
                    y[n..].iter().all(|&v| v == 7.0),
                    "{isa:?} {kern:?} {s:?}: wrote past the end"
                );
                y.truncate(n);
                y
            };
            let rows = run(Kernel::Rows);
            let want = naive(&s, &x, &wt, &b);
            for (i, (g, w)) in rows.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{isa:?} {s:?} at {i}: {g} vs {w}"
                );
            }
            for v in [1, 2] {
                let got = run(Kernel::Channels(v));
                for (i, (g, w)) in got.iter().zip(&rows).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{isa:?} {v} vectors, {s:?} at {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose8_transposes() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let m: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let mut out = [0.0f32; 64];
        // SAFETY: AVX2 and FMA were detected; loads and stores stay inside `m` and `out`.
        unsafe {
            let rows: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(m[8 * i..].as_ptr()));
            for (i, t) in transpose8(rows).iter().enumerate() {
                _mm256_storeu_ps(out[8 * i..].as_mut_ptr(), *t);
            }
        }
        for i in 0..8 {
            for j in 0..8 {
                assert_eq!(out[8 * i + j], m[8 * j + i], "({i}, {j})");
            }
        }
    }

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0.0f32; 256];
        // SAFETY: AVX-512 was detected; loads and stores stay inside `m` and `out`.
        unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m[16 * i..].as_ptr()));
            for (i, t) in transpose16(rows).iter().enumerate() {
                _mm512_storeu_ps(out[16 * i..].as_mut_ptr(), *t);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * i + j], m[16 * j + i], "({i}, {j})");
            }
        }
    }

    #[test]
    fn weight_gradient_equals_the_definition() {
        let isas = isas();
        let mut r = crate::Rng::new(4);
        for &(cin, h, w, cout, pad, n) in &[
            (1, 28, 28, 32, 1, 3),
            (3, 14, 14, 13, 1, 2),
            (5, 7, 9, 4, 0, 1),
            (2, 5, 33, 7, 2, 2),
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
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..cin * h * w).map(|_| r.normal() as f32).collect())
                .collect();
            let dys: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..cout * oh * ow).map(|_| r.normal() as f32).collect())
                .collect();
            let mut want = vec![0.0f64; cout * cin * 9];
            for (x, dy) in xs.iter().zip(&dys) {
                for o in 0..cout {
                    for i in 0..cin {
                        for ki in 0..3 {
                            for kj in 0..3 {
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        let iy = (oy + ki) as isize - pad as isize;
                                        let ix = (ox + kj) as isize - pad as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        want[((o * cin + i) * 3 + ki) * 3 + kj] +=
                                            dy[(o * oh + oy) * ow + ox] as f64
                                                * x[(i * h + iy as usize) * w + ix as usize] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for &isa in &isas {
                let xr: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
                let dr: Vec<&[f32]> = dys.iter().map(|v| v.as_slice()).collect();
                let mut xp = vec![0.0; s.padded_len(isa) * n];
                let mut dw = vec![1.0f32; cout * cin * 9];
                weight_grad_3x3(&s, isa, &xr, &dr, &mut xp, &mut dw);
                for (i, (g, w)) in dw.iter().zip(&want).enumerate() {
                    let w = *w as f32 + 1.0;
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {s:?} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn weight_gradient_along_channels_is_one_fma_chain_per_element() {
        let isas = isas();
        let mut r = crate::Rng::new(5);
        // (cin, h, w, cout, kh, pad, samples): padded channels (20 -> 24 or 32), two and one
        // vectors per block, windows 3 and 5 rows high, row blocks of 1 to 9 rows.
        for &(cin, h, w, cout, kh, pad, n) in &[
            (5, 7, 9, 20, 3, 1, 2),
            (3, 14, 14, 64, 3, 1, 2),
            (2, 6, 33, 7, 5, 2, 1),
            (6, 28, 28, 32, 3, 1, 2),
            (1, 3, 3, 17, 3, 2, 3),
            // Windows 1, 2 and 4 rows high (AVX-512's one-row block), a one-pixel-wide image.
            (5, 9, 20, 20, 1, 0, 2),
            (4, 6, 7, 17, 2, 1, 1),
            (6, 7, 17, 17, 4, 1, 2),
            (6, 4, 1, 20, 3, 1, 1),
        ] {
            let s = Shape {
                cin,
                h,
                w,
                cout,
                kh,
                kw: 3,
                pad,
            };
            let (oh, ow) = (s.oh(), s.ow());
            let k = cin * kh * 3;
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..cin * h * w).map(|_| r.normal() as f32).collect())
                .collect();
            let dys: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..cout * oh * ow).map(|_| r.normal() as f32).collect())
                .collect();
            let start: Vec<f32> = (0..k * cout).map(|_| r.normal() as f32).collect();
            // The definition, as the chain the kernel promises: per element, one fused
            // multiply-add per sample and output pixel, in order.
            let mut chain = start.clone();
            let mut wide = vec![0.0f64; k * cout];
            for (x, dy) in xs.iter().zip(&dys) {
                for i in 0..cin {
                    for ki in 0..kh {
                        for kj in 0..3 {
                            for o in 0..cout {
                                let at = ((i * kh + ki) * 3 + kj) * cout + o;
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        let iy = (oy + ki) as isize - pad as isize;
                                        let ix = (ox + kj) as isize - pad as isize;
                                        let inside = iy >= 0
                                            && ix >= 0
                                            && iy < h as isize
                                            && ix < w as isize;
                                        let xv = if inside {
                                            x[(i * h + iy as usize) * w + ix as usize]
                                        } else {
                                            0.0
                                        };
                                        let g = dy[(o * oh + oy) * ow + ox];
                                        chain[at] = xv.mul_add(g, chain[at]);
                                        wide[at] += xv as f64 * g as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for &isa in &isas {
                let ocp = oc_stride(isa, cout);
                let mut acc = vec![f32::NAN; k * ocp];
                for (row, st) in acc.chunks_mut(ocp).zip(start.chunks(cout)) {
                    row[..cout].copy_from_slice(st);
                    row[cout..].fill(0.0);
                }
                let mut xp = vec![0.0; s.padded_len(isa)];
                let mut dyt = vec![0.0; dy_t_len(&s, isa)];
                // A first sample of NaNs through the scratch, into a throwaway accumulator:
                // it must leave no trace in the padding of `xp` or `dyt`.
                let mut junk = vec![0.0; k * ocp];
                let nan_x = vec![f32::NAN; cin * h * w];
                let nan_dy = vec![f32::NAN; cout * oh * ow];
                weight_grad_oc(&s, isa, &nan_x, &nan_dy, &mut xp, &mut dyt, &mut junk);
                for (x, dy) in xs.iter().zip(&dys) {
                    weight_grad_oc(&s, isa, x, dy, &mut xp, &mut dyt, &mut acc);
                }
                for (t, row) in acc.chunks(ocp).enumerate() {
                    for o in 0..cout {
                        let (g, c) = (row[o], chain[t * cout + o]);
                        assert_eq!(
                            g.to_bits(),
                            c.to_bits(),
                            "{isa:?} {s:?} tap row {t}, channel {o}"
                        );
                        let want = start[t * cout + o] as f64 + wide[t * cout + o];
                        assert!(
                            (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} {s:?} tap row {t}, channel {o}: {g} vs {want}"
                        );
                    }
                    assert!(
                        row[cout..].iter().all(|&v| v == 0.0),
                        "{isa:?} {s:?}: padding channels"
                    );
                }
            }
        }
    }
}
