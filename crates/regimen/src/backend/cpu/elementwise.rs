//! Element-wise kernels: arithmetic, activations and their derivatives.

use rayon::prelude::*;

use crate::backend::Unary;

/// Below this many elements a loop runs on one thread: splitting costs more than it saves.
pub const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

// The maps write each output once into a buffer from the pool (no zeroing pass: these
// kernels are memory-bound).

/// `out[i] = f(a[i])`.
pub fn map1(a: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    if a.len() < PAR_MIN {
        out.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x)));
    }
}

/// `out[i] = f(a[i], b[i])`.
pub fn map2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) {
    if a.len() < PAR_MIN {
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (&x, &y))| *o = f(x, y));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                o.iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(o, (&x, &y))| *o = f(x, y))
            });
    }
}

/// `out[i] = f(a[i], b[i], c[i])`.
pub fn map3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    out: &mut [f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) {
    if a.len() < PAR_MIN {
        out.iter_mut()
            .zip(a.iter().zip(b).zip(c))
            .for_each(|(o, ((&x, &y), &z))| *o = f(x, y, z));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(
                a.par_chunks(CHUNK)
                    .zip(b.par_chunks(CHUNK))
                    .zip(c.par_chunks(CHUNK)),
            )
            .for_each(|(o, ((a, b), c))| {
                o.iter_mut()
                    .zip(a.iter().zip(b).zip(c))
                    .for_each(|(o, ((&x, &y), &z))| *o = f(x, y, z))
            });
    }
}

/// `acc[i] = f(acc[i], a[i])` in place.
pub fn update(acc: &mut [f32], a: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    if acc.len() < PAR_MIN {
        acc.iter_mut().zip(a).for_each(|(s, &x)| *s = f(*s, x));
    } else {
        acc.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(s, a)| s.iter_mut().zip(a).for_each(|(s, &x)| *s = f(*s, x)));
    }
}

/// Sum of `f(x)` in double precision: chunk sums in parallel, then added in chunk order, so
/// the result does not depend on the number of threads.
pub fn sum_f64(a: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    if a.len() < PAR_MIN {
        a.iter().map(|&x| f(x)).sum()
    } else {
        let parts: Vec<f64> = a
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f(x)).sum::<f64>())
            .collect();
        parts.iter().sum()
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_SCALE: f32 = 1.050_701;

/// The error function from Numerical Recipes' Chebyshev fit of erfc (fractional error below
/// 1.2e-7, under f32's resolution near 1), evaluated in f64.
#[inline]
pub fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    // Numerical Recipes' erfc Chebyshev fit, fractional error < 1.2e-7 everywhere.
    let y = t
        * (-x * x - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    (if x >= 0.0 { 1.0 - y } else { y - 1.0 }) as f32
}

#[inline]
fn softplus(x: f32, beta: f32, threshold: f32) -> f32 {
    if x * beta > threshold {
        x
    } else {
        (beta * x).exp().ln_1p() / beta
    }
}

const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `f(x)`.
#[inline]
pub fn forward(op: Unary, x: f32) -> f32 {
    match op {
        Unary::Sigmoid => sigmoid(x),
        Unary::Tanh => x.tanh(),
        Unary::Relu => x.max(0.0),
        Unary::LeakyRelu(a) => {
            if x > 0.0 {
                x
            } else {
                a * x
            }
        }
        Unary::Elu(a) => {
            if x > 0.0 {
                x
            } else {
                a * x.exp_m1()
            }
        }
        Unary::Selu => SELU_SCALE * if x > 0.0 { x } else { SELU_ALPHA * x.exp_m1() },
        Unary::Softplus { beta, threshold } => softplus(x, beta, threshold),
        Unary::Gelu => 0.5 * x * (1.0 + erf(x * INV_SQRT_2)),
        Unary::Mish => x * softplus(x, 1.0, 20.0).tanh(),
        Unary::Swish(b) => x * sigmoid(b * x),
    }
}

/// `f'(x)`, given `x` and `y = f(x)`.
#[inline]
pub fn derivative(op: Unary, x: f32, y: f32) -> f32 {
    match op {
        Unary::Sigmoid => y * (1.0 - y),
        Unary::Tanh => 1.0 - y * y,
        Unary::Relu => (x > 0.0) as u8 as f32,
        Unary::LeakyRelu(a) => {
            if x > 0.0 {
                1.0
            } else {
                a
            }
        }
        Unary::Elu(a) => {
            if x > 0.0 {
                1.0
            } else {
                y + a
            }
        }
        Unary::Selu => {
            if x > 0.0 {
                SELU_SCALE
            } else {
                SELU_SCALE * SELU_ALPHA * x.exp()
            }
        }
        Unary::Softplus { beta, threshold } => {
            if x * beta > threshold {
                1.0
            } else {
                sigmoid(beta * x)
            }
        }
        Unary::Gelu => 0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp(),
        Unary::Mish => {
            let t = softplus(x, 1.0, 20.0).tanh();
            t + x * (1.0 - t * t) * sigmoid(x)
        }
        Unary::Swish(b) => {
            let s = sigmoid(b * x);
            s + b * x * s * (1.0 - s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf values from tables (Abramowitz & Stegun, table 7.1).
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (-1.5, -0.966_105_1),
        ] {
            assert!(
                (erf(x) - want).abs() < 2e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }
}
