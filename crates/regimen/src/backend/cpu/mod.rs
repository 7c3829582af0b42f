//! The CPU backend: `gemm` for matrix products, `rayon` for parallel loops, f64 accumulation
//! for reductions. The thread count is rayon's global pool (`RAYON_NUM_THREADS`, or
//! [`crate::set_threads`]).

mod conv;
mod elementwise;
mod loss;
mod matmul;
mod norm;
mod pool;

pub use elementwise::erf;
pub(crate) use matmul::{gemm, MatRef};

use crate::backend::{Backend, Target, Unary, Window};
use crate::optim::{self, UpdateRule};
use crate::tensor::{Indices, Tensor};
use elementwise::{map1, map2, map3, sum_f64, update};

/// The CPU backend (a unit struct: all state is in the tensors).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

pub static CPU: Cpu = Cpu;

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::from_cpu(shape.to_vec(), data)
}

fn scalar(v: f64) -> Tensor {
    t(&[1], vec![v as f32])
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

    fn zeros(&self, shape: &[usize]) -> Tensor {
        t(shape, vec![0.0; shape.iter().product()])
    }

    fn to_host(&self, x: &Tensor) -> Vec<f32> {
        x.cpu().to_vec()
    }

    fn fill(&self, x: &mut Tensor, value: f32) {
        x.cpu_mut().fill(value);
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
        let am = if trans_a {
            MatRef::t(a.cpu(), ac, ar)
        } else {
            MatRef::new(a.cpu(), ar, ac)
        };
        let bm = if trans_b {
            MatRef::t(b.cpu(), bc, br)
        } else {
            MatRef::new(b.cpu(), br, bc)
        };
        let par = matmul::parallelism(am.rows, am.cols, bm.cols, false);
        gemm(am, bm, c.cpu_mut(), accumulate, par);
    }

    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor, channels: usize) {
        let (_, inner) = n_inner(y.shape(), channels);
        let b = bias.cpu();
        for blk in y.cpu_mut().chunks_mut(channels * inner) {
            for (c, &bc) in b.iter().enumerate() {
                blk[c * inner..(c + 1) * inner]
                    .iter_mut()
                    .for_each(|v| *v += bc);
            }
        }
    }

    fn channel_bias_backward(&self, dy: &Tensor, dbias: &mut Tensor, channels: usize) {
        let (_, inner) = n_inner(dy.shape(), channels);
        let mut acc = vec![0.0f64; channels];
        for blk in dy.cpu().chunks(channels * inner) {
            for (c, a) in acc.iter_mut().enumerate() {
                *a += blk[c * inner..(c + 1) * inner]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
        }
        for (g, a) in dbias.cpu_mut().iter_mut().zip(acc) {
            *g += a as f32;
        }
    }

    fn axpy(&self, alpha: f32, x: &Tensor, y: &mut Tensor) {
        update(y.cpu_mut(), x.cpu(), |s, v| s + alpha * v);
    }

    fn scale(&self, x: &mut Tensor, alpha: f32) {
        x.cpu_mut().iter_mut().for_each(|v| *v *= alpha);
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let out = map2(a.cpu(), b.cpu(), |x, y| x + y);
        t(a.shape(), out)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let out = map2(a.cpu(), b.cpu(), |x, y| x * y);
        t(a.shape(), out)
    }

    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Tensor {
        let row = x.numel() / x.shape()[0].max(1);
        let mut out = x.cpu().to_vec();
        for (r, &f) in out.chunks_mut(row.max(1)).zip(s.cpu()) {
            r.iter_mut().for_each(|v| *v *= f);
        }
        t(x.shape(), out)
    }

    fn clamp(&self, x: &mut Tensor, lo: f32, hi: f32) {
        x.cpu_mut().iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }

    fn optim_update(
        &self,
        rule: UpdateRule,
        step: u64,
        lr: f32,
        wd: f32,
        p: &mut Tensor,
        g: &Tensor,
        slots: &mut [Tensor],
    ) {
        let theta = p.cpu_mut();
        let g = g.cpu();
        let mut s: Vec<&mut [f32]> = slots.iter_mut().map(|t| t.cpu_mut()).collect();
        // L2 weight decay joins the gradient, except for decoupled rules (AdamW).
        let l2 = if matches!(rule, UpdateRule::Adam(a) if a.decoupled) {
            0.0
        } else {
            wd
        };
        let mut scratch = [0.0f32; 3];
        for i in 0..theta.len() {
            let gi = g[i] + l2 * theta[i];
            for (k, v) in s.iter().enumerate() {
                scratch[k] = v[i];
            }
            let [a, b, c] = &mut scratch;
            match rule {
                UpdateRule::Sgd(r) => optim::sgd_update(&r, step == 1, lr, &mut theta[i], gi, a),
                UpdateRule::Adagrad(r) => optim::adagrad_update(&r, step, lr, &mut theta[i], gi, a),
                UpdateRule::RmsProp(r) => optim::rmsprop_update(&r, lr, &mut theta[i], gi, a, b, c),
                UpdateRule::Adam(r) => {
                    optim::adam_update(&r, step, lr, wd, &mut theta[i], gi, a, b, c)
                }
            }
            for (k, v) in s.iter_mut().enumerate() {
                v[i] = scratch[k];
            }
        }
    }

    fn sum_abs(&self, x: &Tensor) -> Tensor {
        scalar(sum_f64(x.cpu(), |v| v.abs() as f64))
    }

    fn sum_sq(&self, x: &Tensor) -> Tensor {
        scalar(sum_f64(x.cpu(), |v| (v as f64) * (v as f64)))
    }

    fn add_sign(&self, alpha: f32, w: &Tensor, g: &mut Tensor) {
        update(g.cpu_mut(), w.cpu(), |s, v| {
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
        // ReLU gets its own loop so that it vectorizes; the others share the generic one.
        let out = match op {
            Unary::Relu => map1(x.cpu(), |v| v.max(0.0)),
            _ => map1(x.cpu(), |v| elementwise::forward(op, v)),
        };
        t(x.shape(), out)
    }

    fn unary_backward(&self, op: Unary, x: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor {
        let out = match op {
            Unary::Relu => map2(x.cpu(), dy.cpu(), |xv, g| if xv > 0.0 { g } else { 0.0 }),
            _ => map3(x.cpu(), y.cpu(), dy.cpu(), |xv, yv, g| {
                g * elementwise::derivative(op, xv, yv)
            }),
        };
        t(x.shape(), out)
    }

    fn prelu_forward(&self, x: &Tensor, a: &Tensor, channels: usize) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        let a = a.cpu();
        let mut out = x.cpu().to_vec();
        for (b, blk) in out.chunks_mut(inner).enumerate() {
            let s = a[if a.len() == 1 { 0 } else { b % channels }];
            blk.iter_mut().for_each(|v| {
                if *v <= 0.0 {
                    *v *= s
                }
            });
        }
        t(x.shape(), out)
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
        let av = a.cpu();
        let mut dx = dy.cpu().to_vec();
        let mut acc = vec![0.0f64; av.len()];
        for (b, (dblk, xblk)) in dx.chunks_mut(inner).zip(x.cpu().chunks(inner)).enumerate() {
            let k = if av.len() == 1 { 0 } else { b % channels };
            for (g, &xv) in dblk.iter_mut().zip(xblk) {
                if xv <= 0.0 {
                    acc[k] += (*g * xv) as f64;
                    *g *= av[k];
                }
            }
        }
        for (g, s) in da.cpu_mut().iter_mut().zip(acc) {
            *g += s as f32;
        }
        t(x.shape(), dx)
    }

    fn swish_forward(&self, x: &Tensor, beta: &Tensor) -> Tensor {
        self.unary_forward(Unary::Swish(beta.cpu()[0]), x)
    }

    fn swish_backward(&self, x: &Tensor, beta: &Tensor, dy: &Tensor, dbeta: &mut Tensor) -> Tensor {
        let b = beta.cpu()[0];
        // d/d beta [x s(beta x)] = x^2 s (1 - s)
        let s: f64 = x
            .cpu()
            .iter()
            .zip(dy.cpu())
            .map(|(&xv, &g)| {
                let sg = elementwise::sigmoid(b * xv);
                (g * xv * xv * sg * (1.0 - sg)) as f64
            })
            .sum();
        dbeta.cpu_mut()[0] += s as f32;
        let y = self.swish_forward(x, beta);
        self.unary_backward(Unary::Swish(b), x, &y, dy)
    }

    fn softmax_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        let mut out = x.cpu().to_vec();
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
        t(x.shape(), out)
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, channels: usize) -> Tensor {
        // dx = y (dy - sum_c dy y)
        let (_, inner) = n_inner(y.shape(), channels);
        let mut dx = vec![0.0f32; y.numel()];
        for ((d, yb), gb) in dx
            .chunks_mut(channels * inner)
            .zip(y.cpu().chunks(channels * inner))
            .zip(dy.cpu().chunks(channels * inner))
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
        t(y.shape(), dx)
    }

    fn conv2d_forward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: Window) -> Tensor {
        let d = conv_dims(x.shape(), w.shape(), win);
        let y = conv::forward(x.cpu(), w.cpu(), b.map(|b| b.cpu()), d);
        t(&[d.n, d.oc, d.oh, d.ow], y)
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
        match conv::backward(
            x.cpu(),
            w.cpu(),
            dy.cpu(),
            d,
            dw.cpu_mut(),
            db.map(|b| b.cpu_mut()),
            input_grad,
        ) {
            Some(dx) => t(x.shape(), dx),
            None => t(&[0], Vec::new()),
        }
    }

    fn max_pool2d_forward(&self, x: &Tensor, win: Window) -> (Tensor, Indices) {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        let (y, idx) = pool::max_forward(x.cpu(), &pool_dims(s, oh, ow), win);
        (t(&[s[0], s[1], oh, ow], y), Indices::from_vec(idx))
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
        t(
            x_shape,
            pool::max_backward(dy.cpu(), idx.cpu(), planes, dy_plane, x_plane),
        )
    }

    fn avg_pool2d_forward(&self, x: &Tensor, win: Window) -> Tensor {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        t(
            &[s[0], s[1], oh, ow],
            pool::avg_forward(x.cpu(), &pool_dims(s, oh, ow), win),
        )
    }

    fn avg_pool2d_backward(&self, dy: &Tensor, x_shape: &[usize], win: Window) -> Tensor {
        let d = pool_dims(x_shape, dy.shape()[2], dy.shape()[3]);
        t(x_shape, pool::avg_backward(dy.cpu(), &d, win))
    }

    fn global_avg_pool_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (n, inner) = n_inner(x.shape(), channels);
        let inv = 1.0 / inner as f64;
        let y = x
            .cpu()
            .chunks(inner)
            .map(|b| (b.iter().map(|&v| v as f64).sum::<f64>() * inv) as f32)
            .collect();
        t(&[n, channels], y)
    }

    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: &[usize]) -> Tensor {
        let planes = dy.numel();
        let inner = x_shape.iter().product::<usize>() / planes.max(1);
        let inv = 1.0 / inner as f32;
        let dx = dy
            .cpu()
            .iter()
            .flat_map(|&g| std::iter::repeat_n(g * inv, inner))
            .collect();
        t(x_shape, dx)
    }

    fn fractional_max_pool2d_forward(
        &self,
        x: &Tensor,
        kernel: (usize, usize),
        out: (usize, usize),
        samples: &[f32],
    ) -> (Tensor, Indices) {
        let s = x.shape();
        let (y, idx) =
            pool::fractional_forward(x.cpu(), &pool_dims(s, out.0, out.1), kernel, samples);
        (t(&[s[0], s[1], out.0, out.1], y), Indices::from_vec(idx))
    }

    fn max_groups_forward(&self, x: &Tensor, k: usize) -> (Tensor, Indices) {
        let (rows, fk) = (x.shape()[0], x.shape()[1]);
        let (y, idx) = pool::max_groups_forward(x.cpu(), rows, fk / k, k);
        (t(&[rows, fk / k], y), Indices::from_vec(idx))
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
        let c = gamma.numel();
        let (n, inner) = n_inner(x.shape(), c);
        let d = norm::NormDims { n, c, inner };
        let (y, mean, invstd, var) = norm::forward_train(x.cpu(), gamma.cpu(), beta.cpu(), &d, eps);
        let m = d.m() as f32;
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        update(running_mean.cpu_mut(), &mean, |r, b| {
            (1.0 - momentum) * r + momentum * b
        });
        update(running_var.cpu_mut(), &var, |r, b| {
            (1.0 - momentum) * r + momentum * b * unbias
        });
        (t(x.shape(), y), t(&[c], mean), t(&[c], invstd))
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
        let y = norm::forward_eval(
            x.cpu(),
            gamma.cpu(),
            beta.cpu(),
            mean.cpu(),
            invstd.cpu(),
            &norm::NormDims { n, c, inner },
        );
        t(x.shape(), y)
    }

    fn invstd(&self, var: &Tensor, eps: f32) -> Tensor {
        let v = var
            .cpu()
            .iter()
            .map(|&v| (1.0 / (v as f64 + eps as f64).sqrt()) as f32)
            .collect();
        t(var.shape(), v)
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
        let c = gamma.numel();
        let (n, inner) = n_inner(x.shape(), c);
        let d = norm::NormDims { n, c, inner };
        let dx = norm::backward(
            x.cpu(),
            dy.cpu(),
            gamma.cpu(),
            mean.cpu(),
            invstd.cpu(),
            &d,
            batch_stats,
            dgamma.cpu_mut(),
            dbeta.cpu_mut(),
        );
        t(x.shape(), dx)
    }

    fn dropout_forward(&self, x: &Tensor, p: f32, seed: u64) -> (Tensor, Tensor) {
        let (y, mask) = norm::dropout(x.cpu(), p, seed);
        (t(x.shape(), y), t(x.shape(), mask))
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Tensor,
        target: Target<'_>,
        smoothing: f32,
        grad_scale: f32,
    ) -> (Tensor, Tensor) {
        let (n, c) = (logits.shape()[0], logits.shape()[1]);
        let (total, grad) = match target {
            Target::Hard(labels) => {
                let l = labels.cpu();
                loss::softmax_cross_entropy(logits.cpu(), c, smoothing, grad_scale, |row, out| {
                    out.fill(0.0);
                    out[l[row] as usize] = 1.0;
                })
            }
            Target::Soft(probs) => {
                let p = probs.cpu();
                loss::softmax_cross_entropy(logits.cpu(), c, smoothing, grad_scale, |row, out| {
                    out.copy_from_slice(&p[row * c..(row + 1) * c]);
                })
            }
        };
        (scalar(total / n as f64), t(logits.shape(), grad))
    }

    fn mse(&self, pred: &Tensor, target: &Tensor, grad_scale: f32) -> (Tensor, Tensor) {
        let n = pred.numel() as f64;
        let total: f64 = pred
            .cpu()
            .iter()
            .zip(target.cpu())
            .map(|(&p, &q)| ((p - q) as f64).powi(2))
            .sum();
        let g = (2.0 / n) as f32 * grad_scale;
        let grad = map2(pred.cpu(), target.cpu(), |p, q| g * (p - q));
        (scalar(total / n), t(pred.shape(), grad))
    }

    fn count_correct(&self, logits: &Tensor, labels: &Indices) -> Tensor {
        scalar(loss::count_correct(logits.cpu(), logits.shape()[1], labels.cpu()) as f64)
    }
}
