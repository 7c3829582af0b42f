//! The CPU backend: `gemm` for matrix products, `rayon` for parallel loops, f64 accumulation
//! for reductions. The thread count is rayon's global pool (`RAYON_NUM_THREADS`, or
//! [`crate::set_threads`]). Every reduction adds its parts in a fixed order, so results do not
//! depend on the number of threads. `bf16`/`f16` inputs are computed through `f32`.

mod conv;
pub(crate) mod direct;
mod elementwise;
mod loss;
mod norm;
mod pool;
mod storage;
mod winograd;

pub use elementwise::erf;
pub use storage::CpuBuffer;
pub(crate) use storage::{f32s, f32s_mut, host_vec, u32s};

use half::{bf16, f16};

use crate::backend::{
    strict, Backend, HostBuf, ParamUpdate, PoolStats, RandomKey, Target, Unary, UpdateRule,
    UpdateScalars, Window,
};
use crate::linalg::{self as matmul, gemm, MatRef};
use crate::tensor::{DType, Device, Indices, Tensor};
use elementwise::{map1, map2, map3, sum_f64, update};
use storage::{alloc, u16s, u16s_mut, u32s_mut};

/// The CPU backend (a unit struct: all state is in the tensors and the pool).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

pub static CPU: Cpu = Cpu;

/// Scratch memory from the pool (im2col columns, partial sums), returned when dropped.
pub(crate) struct Scratch(CpuBuffer, usize);

impl Scratch {
    pub fn new(len: usize) -> Scratch {
        Scratch(CpuBuffer::uninit(len), len)
    }
    /// Scratch, of zeros with `zero` (the direct convolution's padded inputs keep their zero
    /// borders; im2col's columns are written whole).
    pub fn zeroed_if(len: usize, zero: bool) -> Scratch {
        let mut s = Scratch::new(len);
        if zero {
            s.f32_mut().fill(0.0);
        }
        s
    }
    pub fn f32(&self) -> &[f32] {
        // SAFETY: as in `storage`: 4-byte aligned words, any bits are a valid f32.
        unsafe { std::slice::from_raw_parts(self.0.words().as_ptr() as *const f32, self.1) }
    }
    pub fn f32_mut(&mut self) -> &mut [f32] {
        unsafe {
            std::slice::from_raw_parts_mut(self.0.words_mut().as_mut_ptr() as *mut f32, self.1)
        }
    }
}

/// A new `f32` tensor of `shape` written by `f`.
fn make(shape: &[usize], f: impl FnOnce(&mut [f32])) -> Tensor {
    let mut t = alloc(shape, DType::F32);
    f(f32s_mut(&mut t));
    t
}

/// `out[i] = f(a[i])` between element types, in parallel chunks with `par`.
fn convert<A: Copy + Sync, B: Send>(a: &[A], out: &mut [B], par: bool, f: impl Fn(A) -> B + Sync) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 13;
    if par {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x)));
    } else {
        out.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x));
    }
}

/// A new `f32` tensor holding `v`.
fn from_slice(shape: &[usize], v: &[f32]) -> Tensor {
    make(shape, |o| o.copy_from_slice(v))
}

fn scalar(v: f64) -> Tensor {
    from_slice(&[1], &[v as f32])
}

/// The device step counter's value (a CPU "device" read, not a host read).
fn step_of(step: &Indices) -> u32 {
    u32s(step.tensor())[0]
}

/// `(n, inner)` of a `[N, C, inner...]` tensor.
fn n_inner(shape: &[usize], channels: usize) -> (usize, usize) {
    let n = shape[0];
    let total: usize = shape.iter().product();
    (n, total / (n * channels).max(1))
}

fn conv_dims(x: &[usize], w: &[usize], win: Window) -> conv::ConvDims {
    conv::ConvDims {
        n: x[0],
        c: x[1],
        h: x[2],
        w: x[3],
        oc: w[0],
        oh: win.out_len(x[2], win.kh).expect("checked by the layer"),
        ow: win.out_len(x[3], win.kw).expect("checked by the layer"),
        win,
    }
}

fn pool_dims(x: &[usize], oh: usize, ow: usize) -> pool::PoolDims {
    pool::PoolDims {
        planes: x[0] * x[1],
        h: x[2],
        w: x[3],
        oh,
        ow,
    }
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Tensor {
        alloc(shape, dtype)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Tensor {
        let mut t = alloc(shape, dtype);
        match dtype {
            DType::F32 => f32s_mut(&mut t).fill(0.0),
            DType::U32 => u32s_mut(&mut t).fill(0),
            DType::BF16 | DType::F16 => u16s_mut(&mut t).fill(0),
        }
        t
    }

    fn upload(&self, shape: &[usize], dtype: DType, data: HostBuf) -> Tensor {
        let n: usize = shape.iter().product();
        let data = match (dtype, data) {
            // An f32 vector of the right length and no spare capacity (the pool counts lengths)
            // becomes the tensor's storage, without a copy.
            (DType::F32, HostBuf::F32(v)) if v.len() == n && v.capacity() == n && n > 0 => {
                return storage::adopt_f32(shape, v)
            }
            (_, data) => data,
        };
        let mut t = alloc(shape, dtype);
        self.write(&mut t, data);
        t
    }

    fn write(&self, t: &mut Tensor, data: HostBuf) {
        assert_eq!(data.len(), t.numel(), "write: length of the host data");
        match (t.dtype(), data) {
            (DType::F32, HostBuf::F32(v)) => f32s_mut(t).copy_from_slice(&v),
            (DType::U32, HostBuf::U32(v)) => u32s_mut(t).copy_from_slice(&v),
            (DType::BF16 | DType::F16, HostBuf::U16(v)) => u16s_mut(t).copy_from_slice(&v),
            (DType::BF16, HostBuf::F32(v)) => u16s_mut(t)
                .iter_mut()
                .zip(v)
                .for_each(|(o, x)| *o = bf16::from_f32(x).to_bits()),
            (DType::F16, HostBuf::F32(v)) => u16s_mut(t)
                .iter_mut()
                .zip(v)
                .for_each(|(o, x)| *o = f16::from_f32(x).to_bits()),
            (d, v) => panic!("write: {d} tensor from {v:?}"),
        }
    }

    fn download(&self, t: &Tensor) -> HostBuf {
        strict::note_host_read("a CPU tensor");
        match t.dtype() {
            DType::F32 => HostBuf::F32(f32s(t).to_vec()),
            DType::U32 => HostBuf::U32(u32s(t).to_vec()),
            DType::BF16 | DType::F16 => HostBuf::U16(u16s(t).to_vec()),
        }
    }

    fn fill(&self, t: &mut Tensor, value: f32) {
        match t.dtype() {
            DType::F32 => f32s_mut(t).fill(value),
            DType::U32 => u32s_mut(t).fill(value as u32),
            DType::BF16 => u16s_mut(t).fill(bf16::from_f32(value).to_bits()),
            DType::F16 => u16s_mut(t).fill(f16::from_f32(value).to_bits()),
        }
    }

    fn copy(&self, src: &Tensor, dst: &mut Tensor) {
        assert_eq!(
            (src.numel(), src.dtype()),
            (dst.numel(), dst.dtype()),
            "copy"
        );
        match src.dtype() {
            DType::F32 => f32s_mut(dst).copy_from_slice(f32s(src)),
            DType::U32 => u32s_mut(dst).copy_from_slice(u32s(src)),
            _ => u16s_mut(dst).copy_from_slice(u16s(src)),
        }
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Tensor {
        assert!(
            x.dtype().is_float() && dtype.is_float(),
            "cast between floating-point types"
        );
        let mut t = alloc(x.shape(), dtype);
        // In parallel chunks, straight from one type to the other (bf16 activations convert
        // whole activations this way).
        let par = x.numel() >= elementwise::PAR_MIN;
        let (from, to) = (x.dtype(), dtype);
        let decode = |b: u16| match from {
            DType::BF16 => bf16::from_bits(b).to_f32(),
            _ => f16::from_bits(b).to_f32(),
        };
        let encode = |v: f32| match to {
            DType::BF16 => bf16::from_f32(v).to_bits(),
            _ => f16::from_f32(v).to_bits(),
        };
        match (from, to) {
            (DType::F32, DType::F32) => f32s_mut(&mut t).copy_from_slice(f32s(x)),
            (DType::F32, _) => convert(f32s(x), u16s_mut(&mut t), par, encode),
            (_, DType::F32) => convert(u16s(x), f32s_mut(&mut t), par, decode),
            _ => convert(u16s(x), u16s_mut(&mut t), par, |b| encode(decode(b))),
        }
        t
    }

    fn pool_stats(&self) -> PoolStats {
        storage::POOL.stats()
    }

    fn matmul(
        &self,
        a: &Tensor,
        trans_a: bool,
        b: &Tensor,
        trans_b: bool,
        c: &mut Tensor,
        accumulate: bool,
    ) {
        let (ar, ac) = (a.shape()[0], a.shape()[1]);
        let (br, bc) = (b.shape()[0], b.shape()[1]);
        let (a, b) = (a.to_dtype(DType::F32), b.to_dtype(DType::F32));
        let (av, bv) = (f32s(&a), f32s(&b));
        let am = if trans_a {
            MatRef::t(av, ac, ar)
        } else {
            MatRef::new(av, ar, ac)
        };
        let bm = if trans_b {
            MatRef::t(bv, bc, br)
        } else {
            MatRef::new(bv, br, bc)
        };
        let par = matmul::parallelism(am.rows, am.cols, bm.cols, false);
        gemm(am, bm, f32s_mut(c), accumulate, par);
    }

    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor, channels: usize) {
        if y.numel() == 0 {
            return;
        }
        let (_, inner) = n_inner(y.shape(), channels);
        let b = f32s(bias);
        if inner == 1 {
            // Rows of `channels` (a linear layer): one vector pass per row, blocks of rows
            // shared between the threads.
            use rayon::prelude::*;
            let rows = (1usize << 15).div_ceil(channels.max(1));
            f32s_mut(y)
                .par_chunks_mut(rows * channels.max(1))
                .for_each(|blk| {
                    for row in blk.chunks_mut(channels.max(1)) {
                        row.iter_mut().zip(b).for_each(|(v, &bc)| *v += bc);
                    }
                });
            return;
        }
        for blk in f32s_mut(y).chunks_mut(channels * inner) {
            for (c, &bc) in b.iter().enumerate() {
                blk[c * inner..(c + 1) * inner]
                    .iter_mut()
                    .for_each(|v| *v += bc);
            }
        }
    }

    fn bias_relu(&self, y: &mut Tensor, bias: Option<&Tensor>, channels: usize) {
        if y.numel() == 0 {
            return;
        }
        let (_, inner) = n_inner(y.shape(), channels);
        let channels = channels.max(1);
        let b = bias.map(f32s);
        // The sum, then the ReLU of `unary_forward` (`!(v <= 0)` keeps NaN), in one pass.
        let relu = |v: f32| if v <= 0.0 { 0.0 } else { v };
        use rayon::prelude::*;
        if inner == 1 {
            let rows = (1usize << 15).div_ceil(channels);
            f32s_mut(y).par_chunks_mut(rows * channels).for_each(|blk| {
                for row in blk.chunks_mut(channels) {
                    match b {
                        Some(b) => row
                            .iter_mut()
                            .zip(b)
                            .for_each(|(v, &bc)| *v = relu(*v + bc)),
                        None => row.iter_mut().for_each(|v| *v = relu(*v)),
                    }
                }
            });
            return;
        }
        f32s_mut(y)
            .par_chunks_mut(channels * inner)
            .for_each(|blk| {
                for (c, plane) in blk.chunks_mut(inner).enumerate() {
                    match b {
                        Some(b) => {
                            let bc = b[c];
                            plane.iter_mut().for_each(|v| *v = relu(*v + bc))
                        }
                        None => plane.iter_mut().for_each(|v| *v = relu(*v)),
                    }
                }
            });
    }

    fn bias_relu_dropout(
        &self,
        y: &mut Tensor,
        bias: Option<&Tensor>,
        channels: usize,
        p: f32,
        key: RandomKey<'_>,
    ) {
        self.bias_relu(y, bias, channels);
        let step = step_of(key.step);
        norm::dropout_in_place(f32s_mut(y), p, key.stream, step, key.purpose);
    }

    fn bias_relu_backward(
        &self,
        y: &Tensor,
        dy: &Tensor,
        dbias: Option<&mut Tensor>,
        channels: usize,
        keep: f32,
    ) -> Tensor {
        // unary_backward's ReLU from the output (y > 0 exactly where the sum was, NaN where
        // it was), times the dropout's scale, in one pass. (A bf16 `y`, bf16 activations,
        // is read through f32: the same signs, the same NaNs.)
        let y = &y.to_dtype(DType::F32);
        let dz = make(y.shape(), |o| {
            map2(f32s(y), f32s(dy), o, |yv, g| {
                // (The product taken unconditionally, so that the loop vectorizes: in the
                // branch the load of `dy` went with it and the loop stayed scalar.)
                let kept = g * keep;
                if yv > 0.0 {
                    kept
                } else if yv.is_nan() {
                    yv
                } else {
                    0.0
                }
            })
        });
        if let Some(db) = dbias {
            self.channel_bias_backward(&dz, db, channels);
        }
        dz
    }

    fn channel_bias_backward(&self, dy: &Tensor, dbias: &mut Tensor, channels: usize) {
        if dy.numel() == 0 {
            return;
        }
        let (_, inner) = n_inner(dy.shape(), channels);
        if inner == 1 {
            // Column sums of `[N, channels]`: blocks of columns shared between the threads,
            // each summed down the rows in f64 (the same order as below: row 0, 1, ...).
            use rayon::prelude::*;
            const COLS: usize = 128;
            let x = f32s(dy);
            f32s_mut(dbias)
                .par_chunks_mut(COLS)
                .enumerate()
                .for_each(|(k, out)| {
                    let c0 = k * COLS;
                    let mut acc = [0.0f64; COLS];
                    let acc = &mut acc[..out.len()];
                    for row in x.chunks(channels.max(1)) {
                        let seg = &row[c0..c0 + out.len()];
                        acc.iter_mut().zip(seg).for_each(|(a, &v)| *a += v as f64);
                    }
                    out.iter_mut().zip(acc).for_each(|(g, a)| *g += *a as f32);
                });
            return;
        }
        let mut acc = vec![0.0f64; channels];
        for blk in f32s(dy).chunks(channels * inner) {
            for (c, a) in acc.iter_mut().enumerate() {
                *a += blk[c * inner..(c + 1) * inner]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
        }
        for (g, a) in f32s_mut(dbias).iter_mut().zip(acc) {
            *g += a as f32;
        }
    }

    fn axpy(&self, alpha: f32, x: &Tensor, y: &mut Tensor) {
        update(f32s_mut(y), f32s(x), |s, v| s + alpha * v);
    }

    fn scale(&self, x: &mut Tensor, alpha: f32) {
        f32s_mut(x).iter_mut().for_each(|v| *v *= alpha);
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        make(a.shape(), |o| map2(f32s(a), f32s(b), o, |x, y| x + y))
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        make(a.shape(), |o| map2(f32s(a), f32s(b), o, |x, y| x * y))
    }

    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Tensor {
        let row = x.numel() / x.shape()[0].max(1);
        make(x.shape(), |o| {
            for ((o, x), &f) in o
                .chunks_mut(row.max(1))
                .zip(f32s(x).chunks(row.max(1)))
                .zip(f32s(s))
            {
                o.iter_mut().zip(x).for_each(|(o, &v)| *o = v * f);
            }
        })
    }

    fn clamp(&self, x: &mut Tensor, lo: f32, hi: f32) {
        // `f32::clamp` keeps NaN; so does `max`/`min` in this order only by accident, so say it.
        f32s_mut(x).iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }

    fn sum_abs(&self, x: &Tensor) -> Tensor {
        scalar(sum_f64(f32s(x), |v| v.abs() as f64))
    }

    fn sum_sq(&self, x: &Tensor) -> Tensor {
        scalar(sum_f64(f32s(x), |v| (v as f64) * (v as f64)))
    }

    fn add_sign(&self, alpha: f32, w: &Tensor, g: &mut Tensor) {
        update(f32s_mut(g), f32s(w), |s, v| {
            s + alpha
                * if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
        });
    }

    fn unary_forward(&self, op: Unary, x: &Tensor) -> Tensor {
        make(x.shape(), |o| match op {
            // ReLU gets its own loop so that it vectorizes; NaN propagates (as PyTorch):
            // `v > 0 ? v : 0` would turn NaN into 0, `!(v <= 0)` keeps it.
            Unary::Relu => map1(f32s(x), o, |v| if v <= 0.0 { 0.0 } else { v }),
            _ => map1(f32s(x), o, |v| elementwise::forward(op, v)),
        })
    }

    fn unary_backward(&self, op: Unary, x: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor {
        make(x.shape(), |o| match op {
            Unary::Relu => map2(f32s(x), f32s(dy), o, |xv, g| {
                if xv > 0.0 {
                    g
                } else if xv.is_nan() {
                    xv
                } else {
                    0.0
                }
            }),
            _ => map3(f32s(x), f32s(y), f32s(dy), o, |xv, yv, g| {
                g * elementwise::derivative(op, xv, yv)
            }),
        })
    }

    fn prelu_forward(&self, x: &Tensor, a: &Tensor, channels: usize) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        let a = f32s(a);
        make(x.shape(), |o| {
            for (b, (blk, xb)) in o.chunks_mut(inner).zip(f32s(x).chunks(inner)).enumerate() {
                let s = a[if a.len() == 1 { 0 } else { b % channels }];
                blk.iter_mut()
                    .zip(xb)
                    .for_each(|(o, &v)| *o = if v <= 0.0 { v * s } else { v });
            }
        })
    }

    fn prelu_backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        dy: &Tensor,
        da: &mut Tensor,
        channels: usize,
    ) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        let av = f32s(a);
        let mut acc = vec![0.0f64; av.len()];
        let dx = make(x.shape(), |dx| {
            dx.copy_from_slice(f32s(dy));
            for (b, (dblk, xblk)) in dx.chunks_mut(inner).zip(f32s(x).chunks(inner)).enumerate() {
                let k = if av.len() == 1 { 0 } else { b % channels };
                for (g, &xv) in dblk.iter_mut().zip(xblk) {
                    if xv <= 0.0 {
                        acc[k] += (*g * xv) as f64;
                        *g *= av[k];
                    }
                }
            }
        });
        for (g, s) in f32s_mut(da).iter_mut().zip(acc) {
            *g += s as f32;
        }
        dx
    }

    fn swish_forward(&self, x: &Tensor, beta: &Tensor) -> Tensor {
        self.unary_forward(Unary::Swish(f32s(beta)[0]), x)
    }

    fn swish_backward(&self, x: &Tensor, beta: &Tensor, dy: &Tensor, dbeta: &mut Tensor) -> Tensor {
        let b = f32s(beta)[0];
        // d/d beta [x s(beta x)] = x^2 s (1 - s)
        let s: f64 = f32s(x)
            .iter()
            .zip(f32s(dy))
            .map(|(&xv, &g)| {
                let sg = elementwise::sigmoid(b * xv);
                (g * xv * xv * sg * (1.0 - sg)) as f64
            })
            .sum();
        f32s_mut(dbeta)[0] += s as f32;
        let y = self.swish_forward(x, beta);
        self.unary_backward(Unary::Swish(b), x, &y, dy)
    }

    fn softmax_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        make(x.shape(), |out| {
            out.copy_from_slice(f32s(x));
            for blk in out.chunks_mut(channels * inner) {
                for i in 0..inner {
                    let mx = (0..channels)
                        .map(|c| blk[c * inner + i])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut s = 0.0f64;
                    for c in 0..channels {
                        let e = (blk[c * inner + i] - mx).exp();
                        blk[c * inner + i] = e;
                        s += e as f64;
                    }
                    let inv = (1.0 / s) as f32;
                    (0..channels).for_each(|c| blk[c * inner + i] *= inv);
                }
            }
        })
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, channels: usize) -> Tensor {
        // dx = y (dy - sum_c dy y)
        let (_, inner) = n_inner(y.shape(), channels);
        make(y.shape(), |dx| {
            for ((d, yb), gb) in dx
                .chunks_mut(channels * inner)
                .zip(f32s(y).chunks(channels * inner))
                .zip(f32s(dy).chunks(channels * inner))
            {
                for i in 0..inner {
                    let dot: f32 = (0..channels)
                        .map(|c| yb[c * inner + i] * gb[c * inner + i])
                        .sum();
                    for c in 0..channels {
                        let k = c * inner + i;
                        d[k] = yb[k] * (gb[k] - dot);
                    }
                }
            }
        })
    }

    fn conv2d_forward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: Window) -> Tensor {
        let d = conv_dims(x.shape(), w.shape(), win);
        let (x, w) = (x.to_dtype(DType::F32), w.to_dtype(DType::F32));
        let (xv, wv) = (f32s(&x), f32s(&w));
        // A convolution without bias is the kind that batch norm follows: its output planes'
        // statistics are computed while each sample is in cache and left with the output.
        let mut stats = b.is_none().then(|| vec![(0.0, 0.0, 0.0); d.n * d.oc]);
        let mut y = make(&[d.n, d.oc, d.oh, d.ow], |y| {
            conv::forward(xv, wv, b.map(f32s), d, y, stats.as_deref_mut())
        });
        if let Some(stats) = stats {
            storage::set_block_stats(&mut y, d.oh * d.ow, stats);
        }
        y
    }

    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        win: Window,
        dw: &mut Tensor,
        db: Option<&mut Tensor>,
        input_grad: bool,
    ) -> Tensor {
        let d = conv_dims(x.shape(), w.shape(), win);
        let (xh, wh) = (x.to_dtype(DType::F32), w.to_dtype(DType::F32));
        let (xv, wv) = (f32s(&xh), f32s(&wh));
        // Mixed precision: the output gradient enters the products in the inputs' type too.
        let dyq = if x.dtype() == DType::F32 {
            dy.clone()
        } else {
            self.cast(&self.cast(dy, x.dtype()), DType::F32)
        };
        let mut dx = alloc(if input_grad { x.shape() } else { &[0] }, DType::F32);
        conv::backward(
            xv,
            wv,
            f32s(&dyq),
            d,
            f32s_mut(dw),
            db.map(f32s_mut),
            input_grad.then(|| f32s_mut(&mut dx)),
        );
        dx
    }

    fn max_pool2d_forward(&self, x: &Tensor, win: Window) -> (Tensor, Indices) {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        let shape = [s[0], s[1], oh, ow];
        let mut idx = alloc(&[shape.iter().product()], DType::U32);
        let y = make(&shape, |y| {
            pool::max_forward(f32s(x), &pool_dims(s, oh, ow), win, y, u32s_mut(&mut idx))
        });
        (y, Indices::from_tensor(idx, (s[2] * s[3]) as u64))
    }

    fn max_backward(
        &self,
        dy: &Tensor,
        idx: &Indices,
        x_shape: &[usize],
        dy_plane: usize,
        x_plane: usize,
    ) -> Tensor {
        let planes = dy.numel() / dy_plane.max(1);
        make(x_shape, |dx| {
            pool::max_backward(f32s(dy), u32s(idx.tensor()), planes, dy_plane, x_plane, dx)
        })
    }

    fn avg_pool2d_forward(&self, x: &Tensor, win: Window) -> Tensor {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        make(&[s[0], s[1], oh, ow], |y| {
            pool::avg_forward(f32s(x), &pool_dims(s, oh, ow), win, y)
        })
    }

    fn avg_pool2d_backward(&self, dy: &Tensor, x_shape: &[usize], win: Window) -> Tensor {
        let d = pool_dims(x_shape, dy.shape()[2], dy.shape()[3]);
        make(x_shape, |dx| pool::avg_backward(f32s(dy), &d, win, dx))
    }

    fn global_avg_pool_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (n, inner) = n_inner(x.shape(), channels);
        let inv = 1.0 / inner as f64;
        make(&[n, channels], |y| {
            for (o, b) in y.iter_mut().zip(f32s(x).chunks(inner)) {
                *o = (b.iter().map(|&v| v as f64).sum::<f64>() * inv) as f32;
            }
        })
    }

    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: &[usize]) -> Tensor {
        let planes = dy.numel();
        let inner = x_shape.iter().product::<usize>() / planes.max(1);
        let inv = 1.0 / inner as f32;
        make(x_shape, |dx| {
            for (blk, &g) in dx.chunks_mut(inner.max(1)).zip(f32s(dy)) {
                blk.fill(g * inv);
            }
        })
    }

    fn fractional_max_pool2d_forward(
        &self,
        x: &Tensor,
        kernel: (usize, usize),
        out: (usize, usize),
        samples: &Tensor,
    ) -> (Tensor, Indices) {
        let s = x.shape();
        let shape = [s[0], s[1], out.0, out.1];
        let mut idx = alloc(&[shape.iter().product()], DType::U32);
        let y = make(&shape, |y| {
            pool::fractional_forward(
                f32s(x),
                &pool_dims(s, out.0, out.1),
                kernel,
                f32s(samples),
                y,
                u32s_mut(&mut idx),
            )
        });
        (y, Indices::from_tensor(idx, (s[2] * s[3]) as u64))
    }

    fn max_groups_forward(&self, x: &Tensor, k: usize) -> (Tensor, Indices) {
        let (rows, fk) = (x.shape()[0], x.shape()[1]);
        let mut idx = alloc(&[rows * (fk / k)], DType::U32);
        let y = make(&[rows, fk / k], |y| {
            pool::max_groups_forward(f32s(x), fk / k, k, y, u32s_mut(&mut idx))
        });
        (y, Indices::from_tensor(idx, fk as u64))
    }

    fn batch_norm_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor) {
        bn_forward_train(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            norm::After::Nothing,
        )
    }

    fn batch_norm_relu_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor) {
        bn_forward_train(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            norm::After::Relu,
        )
    }

    fn batch_norm_relu_pool_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> Option<(Tensor, Tensor, Tensor)> {
        let &[_, _, h, w] = x.shape() else {
            return None;
        };
        Some(bn_forward_train(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            norm::After::ReluPool2x2 { h, w },
        ))
    }

    fn batch_norm_forward_eval(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Tensor {
        let c = gamma.numel();
        let (n, inner) = n_inner(x.shape(), c);
        let invstd = self.invstd(var, eps);
        // (bf16 in, bf16 out, through f32.)
        let half = x.dtype();
        let x = &x.to_dtype(DType::F32);
        let y = make(x.shape(), |y| {
            norm::forward_eval(
                f32s(x),
                f32s(gamma),
                f32s(beta),
                f32s(mean),
                f32s(&invstd),
                &norm::NormDims { n, c, inner },
                y,
            )
        });
        y.to_dtype(half)
    }

    fn invstd(&self, var: &Tensor, eps: f32) -> Tensor {
        make(var.shape(), |o| {
            for (o, &v) in o.iter_mut().zip(f32s(var)) {
                *o = (1.0 / (v as f64 + eps as f64).sqrt()) as f32;
            }
        })
    }

    fn batch_norm_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        batch_stats: bool,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        let stats = [gamma, mean, invstd];
        bn_backward(
            x,
            dy,
            (norm::After::Nothing, None),
            stats,
            batch_stats,
            dgamma,
            dbeta,
        )
    }

    fn batch_norm_relu_backward(
        &self,
        x: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        // The ReLU's mask is recomputed from x (the forward's exact arithmetic): one stream
        // over memory fewer than reading y, in each of the two passes.
        let stats = [gamma, mean, invstd];
        bn_backward(
            x,
            dy,
            (norm::After::Relu, Some(beta)),
            stats,
            true,
            dgamma,
            dbeta,
        )
    }

    fn batch_norm_relu_pool_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        let &[_, _, h, w] = x.shape() else {
            panic!(
                "batch norm + ReLU + max pool: a 4-d input, got {:?}",
                x.shape()
            );
        };
        let after = norm::After::ReluPool2x2 { h, w };
        let stats = [gamma, mean, invstd];
        bn_backward(x, dy, (after, Some(beta)), stats, true, dgamma, dbeta)
    }

    fn dropout_forward(&self, x: &Tensor, p: f32, key: RandomKey<'_>) -> (Tensor, Tensor) {
        // (A bf16 x, bf16 activations: through f32, y returned in bf16; any other in f32.)
        let half = if x.dtype() == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let x = &x.to_dtype(DType::F32);
        let mut mask = alloc(x.shape(), DType::F32);
        let y = make(x.shape(), |y| {
            norm::dropout(
                f32s(x),
                p,
                key.stream,
                step_of(key.step),
                key.purpose,
                y,
                f32s_mut(&mut mask),
            )
        });
        (y.to_dtype(half), mask)
    }

    fn uniform(&self, shape: &[usize], key: RandomKey<'_>) -> Tensor {
        make(shape, |o| {
            crate::rng::fill_uniform(key.stream, step_of(key.step), key.purpose, 0, o)
        })
    }

    fn bernoulli_keep(&self, shape: &[usize], p: f32, key: RandomKey<'_>) -> Tensor {
        make(shape, |o| {
            crate::rng::fill_uniform(key.stream, step_of(key.step), key.purpose, 0, o);
            o.iter_mut().for_each(|u| *u = (*u >= p) as u8 as f32);
        })
    }

    fn gather_augment(
        &self,
        images: &Tensor,
        labels: &Indices,
        order: &Indices,
        cursor: &Indices,
        out: &mut Tensor,
        labels_out: &mut Indices,
        pad: usize,
        flip_p: f32,
        key: RandomKey<'_>,
    ) {
        let s = out.shape().to_vec();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let per = c * h * w;
        let first = u32s(cursor.tensor())[0] as usize;
        let step = step_of(key.step);
        let order = u32s(order.tensor());
        let (src, lab) = (f32s(images), u32s(labels.tensor()));
        let draw =
            |i: usize, k: u64| crate::rng::uniform(key.stream, step, key.purpose, 4 * i as u64 + k);
        let mut picked = vec![0usize; b];
        for (i, o) in f32s_mut(out).chunks_mut(per).enumerate() {
            let j = order[first + i] as usize;
            picked[i] = j;
            let (dy, dx) = if pad > 0 {
                let span = (2 * pad + 1) as f32;
                (
                    (draw(i, 0) * span) as isize - pad as isize,
                    (draw(i, 1) * span) as isize - pad as isize,
                )
            } else {
                (0, 0)
            };
            let flip = flip_p > 0.0 && draw(i, 2) < flip_p;
            let img = &src[j * per..(j + 1) * per];
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let sx = if flip { w - 1 - x } else { x } as isize;
                        let (iy, ix) = (y as isize + dy, sx + dx);
                        o[(ch * h + y) * w + x] =
                            if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                img[(ch * h + iy as usize) * w + ix as usize]
                            } else {
                                0.0
                            };
                    }
                }
            }
        }
        for (o, j) in u32s_mut(labels_out.tensor_mut()).iter_mut().zip(picked) {
            *o = lab[j];
        }
    }

    fn one_hot(&self, labels: &Indices, out: &mut Tensor) {
        let k = out.shape()[1];
        let o = f32s_mut(out);
        o.fill(0.0);
        for (i, &l) in u32s(labels.tensor()).iter().enumerate() {
            o[i * k + l as usize] = 1.0;
        }
    }

    fn augment_samples(&self, x: &mut Tensor, a: crate::data::Augment, key: RandomKey<'_>) {
        use crate::data::augment::{apply_one, device_sample_stream};
        let s = x.shape().to_vec();
        let shape = [s[1], s[2], s[3]];
        let step = step_of(key.step);
        let per: usize = shape.iter().product();
        for (i, img) in f32s_mut(x).chunks_mut(per.max(1)).enumerate() {
            let stream = device_sample_stream(key.stream, i);
            let mut rng = crate::rng::Rng::philox(stream, step, key.purpose);
            apply_one(a, img, shape, &mut rng);
        }
    }

    fn mix_batch(
        &self,
        x: &mut Tensor,
        soft: &mut Tensor,
        alpha: f32,
        cutmix: bool,
        key: RandomKey<'_>,
    ) {
        let s = x.shape().to_vec();
        let (b, h, w) = (s[0], s[2], s[3]);
        let per = x.numel() / b.max(1);
        let k = soft.shape()[1];
        let mut rng = crate::rng::Rng::philox(key.stream, step_of(key.step), key.purpose);
        let (lam, bx) = crate::data::augment::device_mix_draws(alpha, cutmix, h, w, &mut rng);
        // Pairs (i, B - 1 - i): each reads both, then writes both.
        let pairs = |v: &mut [f32], len: usize| {
            for i in 0..b.div_ceil(2) {
                let j = b - 1 - i;
                for r in 0..len {
                    let (p, q) = (v[i * len + r], v[j * len + r]);
                    v[i * len + r] = lam * p + (1.0 - lam) * q;
                    v[j * len + r] = lam * q + (1.0 - lam) * p;
                }
            }
        };
        match bx {
            None => pairs(f32s_mut(x), per),
            Some(bx) => {
                let xs = f32s_mut(x);
                for i in 0..b / 2 {
                    let (head, tail) = xs.split_at_mut((b - 1 - i) * per);
                    let (a, c) = (&mut head[i * per..(i + 1) * per], &mut tail[..per]);
                    for r in 0..per {
                        let (y, xx) = ((r / w) % h, r % w);
                        if (bx.y0..bx.y1).contains(&y) && (bx.x0..bx.x1).contains(&xx) {
                            std::mem::swap(&mut a[r], &mut c[r]);
                        }
                    }
                }
            }
        }
        pairs(f32s_mut(soft), k);
    }

    fn note_nonfinite(&self, loss: &Tensor, step: &Indices, first: &mut Indices) {
        let s = step_of(step);
        let f = &mut u32s_mut(first.tensor_mut())[0];
        if *f == 0 && !f32s(loss)[0].is_finite() {
            *f = s.wrapping_add(1);
        }
    }

    fn increment(&self, counter: &mut Indices, by: u32) {
        let c = &mut u32s_mut(counter.tensor_mut())[0];
        *c = c.wrapping_add(by);
    }

    fn clip_coefficient(&self, grads: &[&Tensor], max_norm: f32) -> (Tensor, Tensor) {
        // Per tensor in f64, then the tensors in order (PyTorch: the norm of the norms).
        let total: f64 = grads
            .iter()
            .map(|g| sum_f64(f32s(g), |v| (v as f64) * (v as f64)))
            .sum();
        let norm = total.sqrt() as f32;
        // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        // `min` would hide a NaN norm; keep it visible in the coefficient.
        let coef = if norm.is_nan() { f32::NAN } else { coef };
        (scalar(norm as f64), from_slice(&[1], &[coef]))
    }

    fn optim_update(
        &self,
        rule: &UpdateRule,
        s: &UpdateScalars<'_>,
        params: &mut [ParamUpdate<'_>],
    ) {
        let step = step_of(s.step) as u64;
        let lrs = f32s(s.lr);
        let lr = lrs[(step.max(1) as usize - 1).min(lrs.len() - 1)];
        let coef = s.grad_scale.map_or(1.0, |c| f32s(c)[0]);
        for p in params.iter_mut() {
            let lr_p = lr * p.lr_scale;
            let sc = rule.step_scalars(lr_p, step);
            let l2 = if rule.decoupled() {
                0.0
            } else {
                p.weight_decay
            };
            let wd = p.weight_decay;
            let first = step == 1;
            let mut state: Vec<&mut [f32]> = p.state.iter_mut().map(f32s_mut).collect();
            let (theta, g) = (f32s_mut(p.value), f32s_mut(p.grad));
            // The rule is chosen once, outside the element loop.
            match *rule {
                UpdateRule::Sgd {
                    momentum,
                    dampening,
                    nesterov,
                } => update_loop(theta, g, &mut state, coef, l2, |t, g, e| {
                    crate::backend::sgd_element(momentum, dampening, nesterov, first, sc, t, g, e)
                }),
                UpdateRule::Adagrad { eps, .. } => {
                    update_loop(theta, g, &mut state, coef, l2, |t, g, e| {
                        crate::backend::adagrad_element(eps, sc, t, g, e)
                    })
                }
                UpdateRule::RmsProp {
                    alpha,
                    eps,
                    momentum,
                    centered,
                } => update_loop(theta, g, &mut state, coef, l2, |t, g, e| {
                    crate::backend::rmsprop_element(alpha, eps, momentum, centered, sc, t, g, e)
                }),
                UpdateRule::Adam {
                    beta1,
                    beta2,
                    eps,
                    amsgrad,
                    decoupled,
                } => update_loop(theta, g, &mut state, coef, l2, |t, g, e| {
                    crate::backend::adam_element(
                        beta1, beta2, eps, amsgrad, decoupled, sc, lr_p, wd, t, g, e,
                    )
                }),
            }
        }
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Tensor,
        target: Target<'_>,
        smoothing: f32,
        grad_scale: f32,
    ) -> (Tensor, Tensor) {
        let (n, c) = (logits.shape()[0], logits.shape()[1]);
        let mut total = 0.0;
        let grad = make(logits.shape(), |grad| {
            total = match target {
                Target::Hard(labels) => {
                    let l = u32s(labels.tensor());
                    loss::softmax_cross_entropy(
                        f32s(logits),
                        c,
                        smoothing,
                        grad_scale,
                        |row, out| {
                            out.fill(0.0);
                            out[l[row] as usize] = 1.0;
                        },
                        grad,
                    )
                }
                Target::Soft(probs) => {
                    let p = f32s(probs);
                    loss::softmax_cross_entropy(
                        f32s(logits),
                        c,
                        smoothing,
                        grad_scale,
                        |row, out| out.copy_from_slice(&p[row * c..(row + 1) * c]),
                        grad,
                    )
                }
            }
        });
        (scalar(total / n as f64), grad)
    }

    fn mse(&self, pred: &Tensor, target: &Tensor, grad_scale: f32) -> (Tensor, Tensor) {
        let n = pred.numel() as f64;
        let total: f64 = f32s(pred)
            .iter()
            .zip(f32s(target))
            .map(|(&p, &q)| ((p - q) as f64).powi(2))
            .sum();
        let g = (2.0 / n) as f32 * grad_scale;
        let grad = make(pred.shape(), |o| {
            map2(f32s(pred), f32s(target), o, |p, q| g * (p - q))
        });
        (scalar(total / n), grad)
    }

    fn count_correct(&self, logits: &Tensor, labels: &Indices) -> Tensor {
        scalar(loss::count_correct(f32s(logits), logits.shape()[1], u32s(labels.tensor())) as f64)
    }

    fn all_finite(&self, x: &Tensor) -> Tensor {
        scalar(f64::from(u8::from(f32s(x).iter().all(|v| v.is_finite()))))
    }
}

/// Batch-norm backward (through what followed it in its passes, given with the forward's
/// beta); `stats` are gamma, mean and invstd.
fn bn_backward(
    x: &Tensor,
    dy: &Tensor,
    (after, beta): (norm::After, Option<&Tensor>),
    [gamma, mean, invstd]: [&Tensor; 3],
    batch_stats: bool,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Tensor {
    let c = gamma.numel();
    let (n, inner) = n_inner(x.shape(), c);
    let d = norm::NormDims { n, c, inner };
    // (A bf16 x, bf16 activations, read through f32: the values the forward normalized.)
    let x = &x.to_dtype(DType::F32);
    make(x.shape(), |dx| {
        norm::backward(
            f32s(x),
            f32s(dy),
            after,
            beta.map(f32s),
            f32s(gamma),
            f32s(mean),
            f32s(invstd),
            &d,
            batch_stats,
            f32s_mut(dgamma),
            f32s_mut(dbeta),
            dx,
        )
    })
}

/// Batch norm with batch statistics (followed by a ReLU in the same pass with `relu`).
#[allow(clippy::too_many_arguments)]
fn bn_forward_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    eps: f32,
    after: norm::After,
) -> (Tensor, Tensor, Tensor) {
    let c = gamma.numel();
    let (n, inner) = n_inner(x.shape(), c);
    let d = norm::NormDims { n, c, inner };
    // A bf16 x (bf16 activations) is normalized through f32 and y returned in bf16.
    let half = x.dtype();
    let x = &x.to_dtype(DType::F32);
    let mut stats = None;
    let shape = match after {
        norm::After::ReluPool2x2 { h, w } => vec![n, c, h / 2, w / 2],
        _ => x.shape().to_vec(),
    };
    let y = make(&shape, |y| {
        stats = Some(norm::forward_train(
            f32s(x),
            f32s(gamma),
            f32s(beta),
            &d,
            eps,
            after,
            storage::block_stats(x, inner),
            y,
        ))
    });
    let (mean, invstd, var) = stats.expect("written above");
    let m = d.m() as f32;
    let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
    update(f32s_mut(running_mean), &mean, |r, b| {
        (1.0 - momentum) * r + momentum * b
    });
    update(f32s_mut(running_var), &var, |r, b| {
        (1.0 - momentum) * r + momentum * b * unbias
    });
    (
        y.to_dtype(half),
        from_slice(&[c], &mean),
        from_slice(&[c], &invstd),
    )
}

/// The element loop of an optimizer update, in parallel chunks: `g = grad * coef + l2 theta`,
/// the rule `f(theta, g, state)`, and the gradient set to zero.
fn update_loop(
    theta: &mut [f32],
    grad: &mut [f32],
    state: &mut [&mut [f32]],
    coef: f32,
    l2: f32,
    f: impl Fn(&mut f32, f32, &mut [f32; 3]) + Sync,
) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let n = theta.len();
    // Split every state slot into the same chunks as theta and the gradient.
    let mut state_chunks: Vec<Vec<&mut [f32]>> =
        (0..n.div_ceil(CHUNK)).map(|_| Vec::new()).collect();
    for slot in state.iter_mut() {
        for (c, chunk) in slot.chunks_mut(CHUNK).enumerate() {
            state_chunks[c].push(chunk);
        }
    }
    let isa = update_isa();
    let body = |(t, g, st): (&mut [f32], &mut [f32], Vec<&mut [f32]>)| match isa {
        // SAFETY: `update_isa` detected the features.
        #[cfg(target_arch = "x86_64")]
        UpdateIsa::Avx512 => unsafe { update_chunk_avx512(t, g, st, coef, l2, &f) },
        #[cfg(target_arch = "x86_64")]
        UpdateIsa::Avx2 => unsafe { update_chunk_avx2(t, g, st, coef, l2, &f) },
        UpdateIsa::Baseline => update_chunk(t, g, st, coef, l2, &f),
    };
    let work = theta
        .chunks_mut(CHUNK)
        .zip(grad.chunks_mut(CHUNK))
        .zip(state_chunks)
        .map(|((t, g), s)| (t, g, s));
    if n >= 2 * CHUNK {
        work.collect::<Vec<_>>().into_par_iter().for_each(body);
    } else {
        work.for_each(body);
    }
}

#[derive(Clone, Copy)]
enum UpdateIsa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

fn update_isa() -> UpdateIsa {
    #[cfg(target_arch = "x86_64")]
    {
        if direct::avx512_allowed() && is_x86_feature_detected!("avx512vl") {
            return UpdateIsa::Avx512;
        }
        if is_x86_feature_detected!("avx2") {
            return UpdateIsa::Avx2;
        }
    }
    UpdateIsa::Baseline
}

// The chunk loop compiled for wide vectors and chosen at run time: at the baseline (SSE2)
// the compiler left Adam's square root and division scalar. No FMA contraction happens
// (Rust does not fuse `a * b + c`), so every instruction set gives the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2")]
unsafe fn update_chunk_avx512<F: Fn(&mut f32, f32, &mut [f32; 3])>(
    t: &mut [f32],
    g: &mut [f32],
    st: Vec<&mut [f32]>,
    coef: f32,
    l2: f32,
    f: &F,
) {
    update_chunk(t, g, st, coef, l2, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_chunk_avx2<F: Fn(&mut f32, f32, &mut [f32; 3])>(
    t: &mut [f32],
    g: &mut [f32],
    st: Vec<&mut [f32]>,
    coef: f32,
    l2: f32,
    f: &F,
) {
    update_chunk(t, g, st, coef, l2, f)
}

/// One chunk of [`update_loop`]: one indexed loop per slot count over slices of one length,
/// so that the rule (inlined) vectorizes; the same operations per element in the same order
/// as a plain loop, so the same bits.
#[inline(always)]
fn update_chunk<F: Fn(&mut f32, f32, &mut [f32; 3])>(
    t: &mut [f32],
    g: &mut [f32],
    st: Vec<&mut [f32]>,
    coef: f32,
    l2: f32,
    f: &F,
) {
    let n = t.len();
    let g = &mut g[..n];
    let mut st = st.into_iter().map(|s| &mut s[..n]);
    let grad_of = |t: f32, g: &mut f32| {
        let gi = *g * coef + l2 * t;
        *g = 0.0;
        gi
    };
    match (st.next(), st.next(), st.next()) {
        (None, _, _) => {
            for i in 0..n {
                let gi = grad_of(t[i], &mut g[i]);
                let mut e = [0.0f32; 3];
                f(&mut t[i], gi, &mut e);
            }
        }
        (Some(a), None, _) => {
            for i in 0..n {
                let gi = grad_of(t[i], &mut g[i]);
                let mut e = [a[i], 0.0, 0.0];
                f(&mut t[i], gi, &mut e);
                a[i] = e[0];
            }
        }
        (Some(a), Some(b), None) => {
            for i in 0..n {
                let gi = grad_of(t[i], &mut g[i]);
                let mut e = [a[i], b[i], 0.0];
                f(&mut t[i], gi, &mut e);
                (a[i], b[i]) = (e[0], e[1]);
            }
        }
        (Some(a), Some(b), Some(c)) => {
            for i in 0..n {
                let gi = grad_of(t[i], &mut g[i]);
                let mut e = [a[i], b[i], c[i]];
                f(&mut t[i], gi, &mut e);
                (a[i], b[i], c[i]) = (e[0], e[1], e[2]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host vector from the pool becomes a tensor without a copy, and its memory goes back
    /// to the pool with the tensor (a buffer of an unusual length, so that no other test's
    /// buffers interfere).
    #[test]
    fn host_vectors_travel_through_the_pool_without_a_copy() {
        let n = 77_777;
        let mut v = host_vec(n);
        assert_eq!(v.len(), n);
        v.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * 0.5);
        let at = v.as_ptr() as usize;
        let t = Tensor::from_host(&[n], v, Device::Cpu).unwrap();
        assert_eq!(f32s(&t).as_ptr() as usize, at, "adopted, not copied");
        assert_eq!(f32s(&t)[12_345], 6172.5);
        drop(t);
        let before = Cpu.pool_stats().reused;
        let again = host_vec(n);
        assert_eq!(
            again.as_ptr() as usize,
            at,
            "the same memory, from the pool"
        );
        assert!(Cpu.pool_stats().reused > before);
        // A vector with spare capacity is copied (the pool would count less than it holds).
        let mut spare = Vec::with_capacity(n + 10);
        spare.resize(n, 1.5f32);
        let at = spare.as_ptr() as usize;
        let t = Tensor::from_host(&[n], spare, Device::Cpu).unwrap();
        assert_ne!(f32s(&t).as_ptr() as usize, at, "copied");
        assert_eq!(f32s(&t)[n - 1], 1.5);
    }

    /// The bias of a linear layer (`[N, C]`, one value per column): added to every row, and
    /// its gradient the column sums in f64 down the rows, bit for bit as the definition, with
    /// column blocks that do not divide C and more rows than one block of the forward.
    #[test]
    fn linear_bias_and_its_gradient_follow_the_definition() {
        let (n, c) = (301, 300);
        let x: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let b: Vec<f32> = (0..c).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut y = from_slice(&[n, c], &x);
        Cpu.add_channel_bias(&mut y, &from_slice(&[c], &b), c);
        for (i, &v) in f32s(&y).iter().enumerate() {
            assert_eq!(v, x[i] + b[i % c], "element {i}");
        }
        let start: Vec<f32> = (0..c).map(|i| i as f32 * 0.5).collect();
        let mut db = from_slice(&[c], &start);
        Cpu.channel_bias_backward(&from_slice(&[n, c], &x), &mut db, c);
        for (j, &g) in f32s(&db).iter().enumerate() {
            let sum = (0..n).fold(0.0f64, |a, r| a + x[r * c + j] as f64);
            assert_eq!(g, start[j] + sum as f32, "column {j} (accumulated)");
        }
    }

    type Bits = (Vec<u32>, Vec<Vec<u32>>);

    /// One chunk of `rule` with `slots` state slots on the instruction set `isa` (0: baseline,
    /// 1: AVX2, 2: AVX-512): the bits of theta and of the state.
    fn run_chunk<F: Fn(&mut f32, f32, &mut [f32; 3])>(
        rule: &F,
        slots: usize,
        isa: usize,
        n: usize,
    ) -> Bits {
        let wave = |k: f32| (0..n).map(move |i| ((i as f32 * k).sin() + 0.1) * 0.5);
        let mut t: Vec<f32> = wave(0.37).collect();
        let mut g: Vec<f32> = wave(0.91).collect();
        let mut st: Vec<Vec<f32>> = (0..slots)
            .map(|k| wave(0.1 * k as f32 + 0.2).map(f32::abs).collect())
            .collect();
        let sl: Vec<&mut [f32]> = st.iter_mut().map(|v| v.as_mut_slice()).collect();
        match isa {
            // SAFETY: called only where the machine has the features.
            #[cfg(target_arch = "x86_64")]
            1 => unsafe { update_chunk_avx2(&mut t, &mut g, sl, 0.5, 0.01, rule) },
            #[cfg(target_arch = "x86_64")]
            2 => unsafe { update_chunk_avx512(&mut t, &mut g, sl, 0.5, 0.01, rule) },
            _ => update_chunk(&mut t, &mut g, sl, 0.5, 0.01, rule),
        }
        assert!(g.iter().all(|&v| v == 0.0), "the gradient is zeroed");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (bits(&t), st.iter().map(|s| bits(s)).collect())
    }

    /// Lengths around the vector widths (the tails of 8- and 16-wide loops) and a long one.
    fn same_on_every_isa<F: Fn(&mut f32, f32, &mut [f32; 3])>(rule: F, slots: usize) {
        for n in [1, 7, 8, 15, 16, 17, 31, 1000] {
            let want = run_chunk(&rule, slots, 0, n);
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") {
                    assert!(
                        run_chunk(&rule, slots, 1, n) == want,
                        "AVX2, {slots} slots, n {n}"
                    );
                }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    assert!(
                        run_chunk(&rule, slots, 2, n) == want,
                        "AVX-512, {slots} slots, n {n}"
                    );
                }
            }
        }
    }

    /// The update loop compiled for each instruction set gives the bits of the baseline build
    /// (Adam with AMSGrad: square root and division; SGD with Nesterov momentum).
    #[test]
    fn updates_give_the_same_bits_on_every_instruction_set() {
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::adam_element(
                    0.9,
                    0.999,
                    1e-8,
                    true,
                    true,
                    [1e-3, 0.3],
                    1e-3,
                    0.01,
                    t,
                    g,
                    e,
                )
            },
            3,
        );
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::sgd_element(0.9, 0.0, true, false, [0.1, 0.0], t, g, e)
            },
            1,
        );
        // Every other arm: plain SGD (no state), Adam without AMSGrad (two slots), Adagrad,
        // RMSprop centered with momentum (three slots).
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::sgd_element(0.0, 0.0, false, false, [0.1, 0.0], t, g, e)
            },
            0,
        );
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::adam_element(
                    0.9,
                    0.999,
                    1e-8,
                    false,
                    false,
                    [1e-3, 0.3],
                    1e-3,
                    0.0,
                    t,
                    g,
                    e,
                )
            },
            2,
        );
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::adagrad_element(1e-10, [0.01, 0.0], t, g, e)
            },
            1,
        );
        same_on_every_isa(
            |t: &mut f32, g, e: &mut [f32; 3]| {
                crate::backend::rmsprop_element(0.99, 1e-8, 0.9, true, [0.01, 0.0], t, g, e)
            },
            3,
        );
    }

    /// A convolution without bias leaves its output planes' statistics with the output, and
    /// batch norm gives the same bits from them as from reading its input: output, mean,
    /// invstd and running statistics (the 32-channel 28x28 planes of cnn-step, and planes
    /// whose length is no multiple of 8). A write to the output drops them.
    #[test]
    fn statistics_left_by_a_convolution_give_batch_norm_the_same_bits() {
        let cpu = Cpu;
        let win = Window {
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        let mut r = crate::Rng::new(21);
        let mut randn = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| r.normal() as f32 + 0.3).collect();
            Tensor::from_vec(shape, v).unwrap()
        };
        for &(n, c, oc, h, w) in &[(3, 2, 32, 28, 28), (4, 5, 6, 7, 5)] {
            let x = randn(&[n, c, h, w]);
            let wt = randn(&[oc, c, 3, 3]);
            let (gamma, beta) = (randn(&[oc]), randn(&[oc]));
            let mut y = cpu.conv2d_forward(&x, &wt, None, win);
            assert!(
                storage::block_stats(&y, h * w).is_some(),
                "the convolution left them"
            );
            let biased = cpu.conv2d_forward(&x, &wt, Some(&beta), win);
            assert!(
                storage::block_stats(&biased, h * w).is_none(),
                "only without bias"
            );
            let plain = Tensor::from_vec(y.shape(), y.to_vec()).unwrap();
            assert!(storage::block_stats(&plain, h * w).is_none());
            let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let run = |input: &Tensor| {
                let (mut rm, mut rv) = (Tensor::zeros(&[oc], Device::Cpu), randn_like(oc));
                let (out, mean, invstd) =
                    cpu.batch_norm_forward_train(input, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5);
                [bits(&out), bits(&mean), bits(&invstd), bits(&rm), bits(&rv)]
            };
            assert_eq!(run(&y), run(&plain), "{n}x{c}x{h}x{w} -> {oc} channels");
            f32s_mut(&mut y)[0] += 1.0;
            assert!(
                storage::block_stats(&y, h * w).is_none(),
                "a write drops them"
            );
        }
    }

    fn randn_like(n: usize) -> Tensor {
        Tensor::from_vec(&[n], (0..n).map(|i| 1.0 + i as f32 * 0.01).collect()).unwrap()
    }
}
