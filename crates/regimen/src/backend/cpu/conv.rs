//! 2-D convolution on the CPU: im2col + `gemm`, parallel over samples.
//!
//! Per sample (`x_s`: `[C, H, W]`, `col`: `[C KH KW, OH OW]`):
//! forward `y_s = W col + b`; backward `dW += dy_s col^T`, `dcol = W^T dy_s`, `dx_s = col2im(dcol)`.
//! Stride-1 windows take the direct kernels of [`direct`] on x86-64: the forward and the input
//! gradient as direct convolutions, the weight gradient without a column matrix; 3x3 windows
//! with enough channels take Winograd's F(2x2, 3x3) for all three ([`winograd`]).

use rayon::prelude::*;

use super::{direct, norm, winograd, Scratch};
use crate::backend::Window;
use crate::linalg::{gemm, parallelism, MatRef};

#[derive(Clone, Copy)]
pub struct ConvDims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oc: usize,
    pub oh: usize,
    pub ow: usize,
    pub win: Window,
}

impl ConvDims {
    fn k(&self) -> usize {
        self.c * self.win.kh * self.win.kw
    }
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// A 1x1, stride-1, unpadded convolution reads the input as its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.win.kh == 1 && self.win.kw == 1 && self.win.stride == 1 && self.win.pad == 0
    }
    /// The direct kernel's view of the forward convolution, when it takes it.
    fn direct(&self) -> Option<(direct::Isa, direct::Shape)> {
        let isa = direct::isa()?;
        let s = direct::Shape {
            cin: self.c,
            h: self.h,
            w: self.w,
            cout: self.oc,
            kh: self.win.kh,
            kw: self.win.kw,
            pad: self.win.pad,
        };
        (self.win.stride == 1 && !self.is_pointwise() && s.ok()).then_some((isa, s))
    }
    /// The input gradient as a direct convolution of `dy` (padded by `k - 1 - pad`, the kernel
    /// flipped and its channel axes swapped), when the kernel takes it.
    fn direct_dx(&self) -> Option<(direct::Isa, direct::Shape)> {
        let isa = direct::isa()?;
        let (kh, kw, p) = (self.win.kh, self.win.kw, self.win.pad);
        if self.win.stride != 1 || self.is_pointwise() || p >= kh || p >= kw || kh != kw {
            return None;
        }
        let s = direct::Shape {
            cin: self.oc,
            h: self.oh,
            w: self.ow,
            cout: self.c,
            kh,
            kw,
            pad: kh - 1 - p,
        };
        (s.ok() && s.oh() == self.h && s.ow() == self.w).then_some((isa, s))
    }
}

/// A stride-1 convolution's weights packed for the kernel that runs it on this machine:
/// Winograd's F(2x2, 3x3) where [`winograd::takes`] the shape, else the direct kernel.
struct Packed {
    isa: direct::Isa,
    s: direct::Shape,
    winograd: bool,
    w: Vec<f32>,
}

impl Packed {
    /// `w(o, i, ki, kj)`: the weight of output channel `o`, input channel `i`, window position
    /// `(ki, kj)` of the convolution `s`.
    fn new(
        (isa, s): (direct::Isa, direct::Shape),
        w: impl Fn(usize, usize, usize, usize) -> f32,
    ) -> Packed {
        let winograd = winograd::takes(&s, isa);
        let w = if winograd {
            winograd::pack(&s, w)
        } else {
            direct::pack(&s, isa, w)
        };
        Packed {
            isa,
            s,
            winograd,
            w,
        }
    }
    /// The scratch a sample takes (zeroed before its first use).
    fn scratch_len(&self) -> usize {
        if self.winograd {
            winograd::scratch_len(&self.s, self.isa)
        } else {
            self.s.padded_len(self.isa)
        }
    }
    fn run(&self, x: &[f32], bias: Option<&[f32]>, scratch: &mut [f32], y: &mut [f32]) {
        if self.winograd {
            winograd::conv(&self.s, self.isa, x, &self.w, bias, scratch, y);
        } else {
            direct::conv(&self.s, self.isa, x, &self.w, bias, scratch, y);
        }
    }
}

/// The output columns `ox` whose input column `ox s + kj - pad` lies inside `[0, w)`:
/// `[lo, hi)`. Outside that range the window reads padding.
#[inline]
fn valid_cols(kj: usize, d: &ConvDims) -> (usize, usize) {
    let (s, pad) = (d.win.stride, d.win.pad);
    let lo = if kj >= pad { 0 } else { (pad - kj).div_ceil(s) };
    let hi = if d.w + pad > kj {
        (d.w + pad - kj).div_ceil(s).min(d.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// `col[(ci KH + ki) KW + kj, oy OW + ox] = x[ci, oy s + ki - pad, ox s + kj - pad]` (0 outside).
pub fn im2col(x: &[f32], d: &ConvDims, col: &mut [f32]) {
    let Window {
        kh,
        kw,
        stride,
        pad,
    } = d.win;
    let (oh, ow) = (d.oh, d.ow);
    for ci in 0..d.c {
        let plane = &x[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for ki in 0..kh {
            for kj in 0..kw {
                let (lo, hi) = valid_cols(kj, d);
                let row = &mut col[((ci * kh + ki) * kw + kj) * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let iy = (oy * stride + ki) as isize - pad as isize;
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy >= d.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if lo < hi {
                        let start = lo * stride + kj - pad;
                        if stride == 1 {
                            out[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (o, ix) in out[lo..hi].iter_mut().zip((start..).step_by(stride)) {
                                *o = src[ix];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx[ci, iy, ix] += dcol[...]` over every window that read it.
pub fn col2im(dcol: &[f32], d: &ConvDims, dx: &mut [f32]) {
    let Window {
        kh,
        kw,
        stride,
        pad,
    } = d.win;
    let (oh, ow) = (d.oh, d.ow);
    for ci in 0..d.c {
        let plane = &mut dx[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for ki in 0..kh {
            for kj in 0..kw {
                let (lo, hi) = valid_cols(kj, d);
                if lo >= hi {
                    continue;
                }
                let row = &dcol[((ci * kh + ki) * kw + kj) * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let iy = (oy * stride + ki) as isize - pad as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    let src = &row[oy * ow + lo..oy * ow + hi];
                    let start = lo * stride + kj - pad;
                    if stride == 1 {
                        dst[start..start + src.len()]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(a, &g)| *a += g);
                    } else {
                        for (&g, ix) in src.iter().zip((start..).step_by(stride)) {
                            dst[ix] += g;
                        }
                    }
                }
            }
        }
    }
}

fn outer_parallel(n: usize) -> bool {
    n >= rayon::current_num_threads() && rayon::current_num_threads() > 1
}

/// A block's `(count, mean, sum of squared deviations)`: [`norm::block_stats`].
type Stats = (f64, f64, f64);

/// Writes `y` (`[N, OC, OH, OW]`), and with `stats` (`N OC` entries) each output plane's
/// [`norm::block_stats`], computed while the sample is in cache (batch norm then need not read
/// `y` for them).
pub fn forward(
    x: &[f32],
    wt: &[f32],
    b: Option<&[f32]>,
    d: ConvDims,
    y: &mut [f32],
    stats: Option<&mut [Stats]>,
) {
    let (k, p) = (d.k(), d.p());
    let outer = outer_parallel(d.n);
    let par = parallelism(d.oc, k, p, outer);
    let direct = d.direct();
    let packed = direct.map(|(isa, s)| {
        let (kh, kw) = (s.kh, s.kw);
        Packed::new((isa, s), |o, i, ki, kj| {
            wt[((o * d.c + i) * kh + ki) * kw + kj]
        })
    });
    let one =
        |col: &mut [f32], x_s: &[f32], y_s: &mut [f32], st: Option<&mut [(f64, f64, f64)]>| {
            if let Some(packed) = &packed {
                packed.run(x_s, b, col, y_s);
            } else {
                let cols: &[f32] = if d.is_pointwise() {
                    x_s
                } else {
                    im2col(x_s, &d, col);
                    col
                };
                gemm(
                    MatRef::new(wt, d.oc, k),
                    MatRef::new(cols, k, p),
                    y_s,
                    false,
                    par,
                );
                if let Some(b) = b {
                    for (o, &bo) in b.iter().enumerate() {
                        y_s[o * p..(o + 1) * p].iter_mut().for_each(|v| *v += bo);
                    }
                }
            }
            if let Some(st) = st {
                for (o, plane) in st.iter_mut().zip(y_s.chunks(p)) {
                    *o = norm::block_stats(plane);
                }
            }
        };
    let xs = d.c * d.h * d.w;
    let col_len = match &packed {
        Some(packed) => packed.scratch_len(),
        None if d.is_pointwise() => 0,
        None => k * p,
    };
    // Per-sample pieces of `stats` (none when not wanted).
    let mut pieces: Vec<Option<&mut [Stats]>> = match stats {
        Some(st) => st.chunks_mut(d.oc).map(Some).collect(),
        None => (0..d.n).map(|_| None).collect(),
    };
    if outer {
        // One contiguous run of samples per thread, its scratch allocated here: the number of
        // buffers a call takes is fixed (rayon's work stealing would vary it).
        let t = rayon::current_num_threads().min(d.n).max(1);
        let per = d.n.div_ceil(t);
        let mut cols: Vec<Scratch> = (0..d.n.div_ceil(per))
            .map(|_| Scratch::zeroed_if(col_len, direct.is_some()))
            .collect();
        y.par_chunks_mut(per * d.oc * p)
            .zip(x.par_chunks(per * xs))
            .zip(pieces.par_chunks_mut(per))
            .zip(cols.par_iter_mut())
            .for_each(|(((ys, xs_), sts), col)| {
                let samples = ys.chunks_mut(d.oc * p).zip(xs_.chunks(xs));
                for ((y_s, x_s), st) in samples.zip(sts.iter_mut()) {
                    one(col.f32_mut(), x_s, y_s, st.take());
                }
            });
    } else {
        let mut col = Scratch::zeroed_if(col_len, direct.is_some());
        let samples = y.chunks_mut(d.oc * p).zip(x.chunks(xs));
        for ((y_s, x_s), st) in samples.zip(pieces.iter_mut()) {
            one(col.f32_mut(), x_s, y_s, st.take());
        }
    }
}

/// Samples are summed into the weight gradient in this many fixed groups (fewer when the batch
/// is smaller), each group in order, then the groups in order: the result does not depend on
/// the number of threads.
const DW_GROUPS: usize = 16;

/// One group of samples of the weight-gradient sum: its partial sum (`OC x K` from the
/// few-channel direct kernel, `K x OCP` from the one along output channels, `K x OC` from gemm),
/// the input-gradient slices of its samples, and its sample range.
type Work<'a> = (&'a mut [f32], Vec<Option<&'a mut [f32]>>, usize, usize);

/// Writes `dx` when given; accumulates into `dw` and `db`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    d: ConvDims,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
) {
    let (k, p) = (d.k(), d.p());
    let xs = d.c * d.h * d.w;
    let pointwise = d.is_pointwise();
    let groups = d.n.clamp(1, DW_GROUPS);
    let outer = outer_parallel(groups);
    let par = parallelism(k, d.oc, p, outer);
    // The weight gradient of a 3x3 stride-1 window with few input channels by the direct
    // kernel, per group of samples (their padded inputs in the column scratch). With few
    // channels the product dy col^T has a thin output (OC x 9C) and gemm runs far from peak
    // (cnn-step's first convolution: 2.15 -> 1.10 ms); from 32 channels on, gemm is as fast or
    // faster (measured on the Xeon: 25.2 vs 25.4 ms at 32, 20.5 vs 22.5 ms at 64 channels).
    let direct_dw = d
        .direct()
        .filter(|(_, s)| s.kh == 3 && s.kw == 3 && s.cin <= 4);
    // With more channels, windows 3 wide: the kernel with vectors along output channels
    // (cnn-step's 32- and 64-channel convolutions: no column matrix, no gemm packing).
    let wide_dw = d.direct().filter(|(_, s)| s.kw == 3 && direct_dw.is_none());
    // Of those, 3x3 windows with enough channels by Winograd's F(2x2, 3x3): the group's
    // 16 transformed sums in the column scratch, turned into its partial sum after its last
    // sample.
    let wino_dw = wide_dw.is_some_and(|(isa, s)| winograd::takes(&s, isa));
    let col_len = match (direct_dw, wide_dw) {
        (Some((isa, s)), _) => s.padded_len(isa) * d.n.div_ceil(groups),
        (_, Some((isa, s))) if wino_dw => winograd::dw_scratch_len(&s, isa),
        (_, Some((isa, s))) => s.padded_len(isa),
        _ if pointwise => 0,
        _ => k * p,
    };
    let dyt_len = match wide_dw {
        Some((_, s)) if wino_dw => winograd::dyt_len(&s),
        Some((isa, s)) => direct::dy_t_len(&s, isa),
        None => 0,
    };
    // Each group's partial sum: `OC x K` (direct kernel), `K x OCP` (along channels, rows
    // padded to whole vectors), `K x OC` (gemm).
    let acc_stride = wide_dw.map_or(d.oc, |(isa, _)| direct::oc_stride(isa, d.oc));
    let acc_len = k * acc_stride;
    // The input gradient as a direct convolution of dy where the kernel takes it.
    let direct_dx = if dx.is_some() { d.direct_dx() } else { None };
    let packed_dx = direct_dx.map(|(isa, s)| {
        let (kh, kw) = (s.kh, s.kw);
        Packed::new((isa, s), |ci, oc, ki, kj| {
            wt[((oc * d.c + ci) * kh + (kh - 1 - ki)) * kw + (kw - 1 - kj)]
        })
    });
    let dcol_len = match (dx.is_some(), &packed_dx) {
        (false, _) => 0,
        (true, Some(packed)) => packed.scratch_len(),
        (true, None) => k * p,
    };
    let mut partial = Scratch::new(groups * acc_len);
    let mut dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => dx.chunks_mut(xs).map(Some).collect(),
        None => (0..d.n).map(|_| None).collect(),
    };
    // Group g: samples [g n / groups, (g + 1) n / groups).
    let bounds = |g: usize| (g * d.n / groups, (g + 1) * d.n / groups);
    let mut work: Vec<Work<'_>> = Vec::new();
    {
        let mut rest = dx_chunks.as_mut_slice();
        let mut taken = 0;
        for (g, acc) in partial.f32_mut().chunks_mut(acc_len).enumerate() {
            let (lo, hi) = bounds(g);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(hi - taken);
            let _ = lo;
            taken = hi;
            rest = tail;
            work.push((acc, mine.iter_mut().map(|c| c.take()).collect(), lo, hi));
        }
    }
    let run = |(acc, dxs, lo, hi): Work<'_>, [col, dcol, dyt]: &mut [Scratch; 3]| {
        if let Some((isa, s)) = direct_dw {
            acc.fill(0.0);
            let xr: Vec<&[f32]> = (lo..hi).map(|i| &x[i * xs..(i + 1) * xs]).collect();
            let dr: Vec<&[f32]> = (lo..hi)
                .map(|i| &dy[i * d.oc * p..(i + 1) * d.oc * p])
                .collect();
            direct::weight_grad_3x3(&s, isa, &xr, &dr, col.f32_mut(), acc);
        }
        for (j, (s, dx_s)) in (lo..hi).zip(dxs).enumerate() {
            let x_s = &x[s * xs..(s + 1) * xs];
            let dy_s = &dy[s * d.oc * p..(s + 1) * d.oc * p];
            if let (Some((isa, s)), true) = (wide_dw, wino_dw) {
                let (col, dyt) = (col.f32_mut(), dyt.f32_mut());
                winograd::weight_grad(&s, isa, x_s, dy_s, j == 0, col, dyt);
                if lo + j + 1 == hi {
                    winograd::weight_grad_finish(&s, isa, col, acc, acc_stride);
                }
            } else if let Some((isa, s)) = wide_dw {
                if j == 0 {
                    acc.fill(0.0);
                }
                direct::weight_grad_oc(&s, isa, x_s, dy_s, col.f32_mut(), dyt.f32_mut(), acc);
            } else if direct_dw.is_none() {
                let cols: &[f32] = if pointwise {
                    x_s
                } else {
                    im2col(x_s, &d, col.f32_mut());
                    col.f32()
                };
                // dW_g^T (+)= col dy_s^T (K x OC): the first sample of the group writes, the
                // rest add. This side of the product is about 1.5x faster in gemm than
                // dy_s col^T (its long side is the column matrix's rows).
                gemm(
                    MatRef::new(cols, k, p),
                    MatRef::t(dy_s, p, d.oc),
                    acc,
                    j > 0,
                    par,
                );
            }
            let Some(dx_s) = dx_s else { continue };
            if let Some(packed) = &packed_dx {
                packed.run(dy_s, None, dcol.f32_mut(), dx_s);
            } else if pointwise {
                gemm(
                    MatRef::t(wt, k, d.oc),
                    MatRef::new(dy_s, d.oc, p),
                    dx_s,
                    false,
                    par,
                );
            } else {
                gemm(
                    MatRef::t(wt, k, d.oc),
                    MatRef::new(dy_s, d.oc, p),
                    dcol.f32_mut(),
                    false,
                    par,
                );
                dx_s.fill(0.0);
                col2im(dcol.f32(), &d, dx_s);
            }
        }
    };
    // Groups go to workers round-robin; each worker's scratch is allocated here, so a call
    // takes a fixed number of buffers whatever rayon's scheduling.
    let workers = if outer {
        rayon::current_num_threads().min(groups).max(1)
    } else {
        1
    };
    let mut per_worker: Vec<Vec<Work<'_>>> = (0..workers).map(|_| Vec::new()).collect();
    for (g, w) in work.into_iter().enumerate() {
        per_worker[g % workers].push(w);
    }
    let mut scratch: Vec<[Scratch; 3]> = (0..workers)
        .map(|_| {
            [
                Scratch::zeroed_if(col_len, direct_dw.is_some() || wide_dw.is_some()),
                Scratch::zeroed_if(dcol_len, direct_dx.is_some()),
                Scratch::zeroed_if(dyt_len, true),
            ]
        })
        .collect();
    let body = |(items, sc): (Vec<Work<'_>>, &mut [Scratch; 3])| {
        for w in items {
            run(w, sc);
        }
    };
    if workers > 1 {
        per_worker
            .into_par_iter()
            .zip(scratch.par_iter_mut())
            .for_each(body);
    } else {
        per_worker
            .into_iter()
            .zip(scratch.iter_mut())
            .for_each(body);
    }
    if direct_dw.is_some() {
        for acc in partial.f32().chunks(acc_len) {
            dw.iter_mut().zip(acc).for_each(|(a, &b)| *a += b);
        }
    } else {
        // The other paths sum dW^T: `dw` is transposed once into that layout, the groups are
        // added to it in order (contiguous rows: the same sums as adding each group to `dw`
        // element by element, without a strided pass per group), and it is transposed back.
        let mut scratch = Scratch::new(acc_len);
        let t = scratch.f32_mut();
        for (o, row) in dw.chunks(k).enumerate() {
            for (i, &a) in row.iter().enumerate() {
                t[i * acc_stride + o] = a;
            }
        }
        for acc in partial.f32().chunks(acc_len) {
            t.iter_mut().zip(acc).for_each(|(a, &b)| *a += b);
        }
        for (o, row) in dw.chunks_mut(k).enumerate() {
            for (i, a) in row.iter_mut().enumerate() {
                *a = t[i * acc_stride + o];
            }
        }
    }
    if let Some(db) = db {
        for dy_s in dy.chunks(d.oc * p) {
            for (o, g) in db.iter_mut().enumerate() {
                *g += dy_s[o * p..(o + 1) * p].iter().sum::<f32>();
            }
        }
    }
}
