//! Weight initialization.
//!
//! The lecture's experiment: with `W = 0.01 * randn` the activations of a 10-layer tanh net
//! shrink to zero layer by layer; with `W = randn` they saturate at ±1; Xavier
//! (`Var(W) = 1/fan_in`, or `2/(fan_in + fan_out)` to balance forward and backward) keeps them
//! alive for tanh; ReLU halves the variance at each layer, which He et al. (2015) correct with
//! `Var(W) = 2/fan_in`; for PReLU / Leaky ReLU with slope `a`, `(1 + a^2) n Var(W) / 2 = 1`,
//! i.e. `Var(W) = 2 / ((1 + a^2) fan_in)`.
//!
//! Note: the lecture's slide prints He init as `randn(fan_in, fan_out) / np.sqrt(2/fan_in)`;
//! the correct standard deviation is `sqrt(2/fan_in)` (multiply, not divide), as implemented.
//!
//! Fans follow PyTorch (`torch.nn.init._calculate_fan_in_and_fan_out`): for a weight of shape
//! `[out, in, k...]`, `fan_in = in * prod(k)` and `fan_out = out * prod(k)`.

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{Device, Tensor};

/// Which fan a Kaiming initialization preserves the variance over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fan {
    /// Preserve the variance of activations in the forward pass (PyTorch's default).
    In,
    /// Preserve the variance of gradients in the backward pass.
    Out,
}

/// An initialization scheme. Each samples a tensor of a given shape from a seeded [`Rng`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Constant(f32),
    /// Gaussian; the lecture's "small random numbers" are `Normal { mean: 0, std: 0.01 }`.
    Normal {
        mean: f32,
        std: f32,
    },
    Uniform {
        low: f32,
        high: f32,
    },
    /// Glorot & Bengio (2010): `std = gain sqrt(2 / (fan_in + fan_out))`.
    XavierNormal {
        gain: f32,
    },
    /// Uniform with the same variance: bound `gain sqrt(6 / (fan_in + fan_out))`.
    XavierUniform {
        gain: f32,
    },
    /// He et al. (2015): `std = sqrt(2 / ((1 + a^2) fan))`; `a` is the negative slope of the
    /// Leaky ReLU / PReLU that follows (0 for ReLU).
    KaimingNormal {
        a: f32,
        fan: Fan,
    },
    /// Uniform with the same variance: bound `sqrt(3) std`.
    KaimingUniform {
        a: f32,
        fan: Fan,
    },
    /// LeCun (1998), the init SELU needs: `std = 1 / sqrt(fan_in)` (plain normal, not the
    /// truncated normal of some libraries).
    LeCunNormal,
    /// Saxe et al. (2014): a (semi-)orthogonal matrix of the weight flattened to
    /// `[out, in * prod(k)]`, times `gain`.
    Orthogonal {
        gain: f32,
    },
    /// PyTorch's default for `nn.Linear` and `nn.Conv2d` weights and biases:
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (`kaiming_uniform_(a = sqrt(5))`). The fan is that
    /// of the layer's weight, given to [`Init::sample_with_fan`] for biases.
    PyTorchDefault,
}

/// `(fan_in, fan_out)` of a weight shape, as PyTorch computes them.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    match shape.len() {
        0 => (1, 1),
        1 => (shape[0], shape[0]),
        _ => {
            let receptive: usize = shape[2..].iter().product();
            (shape[1] * receptive, shape[0] * receptive)
        }
    }
}

/// The recommended gain for a non-linearity (PyTorch's `calculate_gain`): 1 for linear and
/// sigmoid, 5/3 for tanh, sqrt(2) for ReLU, sqrt(2 / (1 + a^2)) for Leaky ReLU / PReLU with
/// slope `a`, 3/4 for SELU.
pub fn gain(nonlinearity: &str, a: f32) -> Result<f32> {
    Ok(match nonlinearity {
        "linear" | "identity" | "sigmoid" | "conv" => 1.0,
        "tanh" => 5.0 / 3.0,
        "relu" => 2f32.sqrt(),
        "leaky_relu" | "prelu" => (2.0 / (1.0 + a * a)).sqrt(),
        "selu" => 0.75,
        other => {
            return Err(Error::config(
                "nonlinearity",
                other,
                "expected linear, sigmoid, tanh, relu, leaky_relu, prelu or selu",
            ))
        }
    })
}

impl Init {
    /// Parse `default`, `normal:STD`, `uniform:LO:HI`, `constant:V`, `xavier[:GAIN]` (normal),
    /// `xavier_uniform[:GAIN]`, `he[:A]` / `kaiming[:A]` (normal, fan in, slope `A` of a
    /// following leaky ReLU), `he_uniform[:A]`, `lecun`, `orthogonal[:GAIN]`.
    pub fn parse(spec: &str) -> Result<Init> {
        let mut parts = spec.split(':');
        let name = parts.next().unwrap_or("");
        let args: Vec<&str> = parts.collect();
        let bad = |why: &str| Error::config("init", spec, why);
        let num = |i: usize, default: Option<f32>| -> Result<f32> {
            match args.get(i) {
                Some(a) => a
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| bad("its parameters must be finite numbers")),
                None => default.ok_or_else(|| bad("a parameter is missing")),
            }
        };
        let max_args = match name {
            "default" | "pytorch" | "lecun" => 0,
            "uniform" => 2,
            _ => 1,
        };
        if args.len() > max_args {
            return Err(bad("too many parameters"));
        }
        Ok(match name {
            "default" | "pytorch" => Init::PyTorchDefault,
            "normal" => Init::Normal {
                mean: 0.0,
                std: Some(num(0, None)?)
                    .filter(|&s| s >= 0.0)
                    .ok_or_else(|| bad("the standard deviation must be at least 0"))?,
            },
            "uniform" => {
                let (low, high) = (num(0, None)?, num(1, None)?);
                if low > high {
                    return Err(bad("needs LO <= HI"));
                }
                Init::Uniform { low, high }
            }
            "constant" => Init::Constant(num(0, None)?),
            "xavier" | "xavier_normal" | "glorot" => Init::XavierNormal { gain: num(0, Some(1.0))? },
            "xavier_uniform" => Init::XavierUniform { gain: num(0, Some(1.0))? },
            "he" | "kaiming" | "he_normal" => Init::KaimingNormal {
                a: num(0, Some(0.0))?,
                fan: Fan::In,
            },
            "he_uniform" | "kaiming_uniform" => Init::KaimingUniform {
                a: num(0, Some(0.0))?,
                fan: Fan::In,
            },
            "lecun" => Init::LeCunNormal,
            "orthogonal" => Init::Orthogonal { gain: num(0, Some(1.0))? },
            _ => {
                return Err(bad(
                    "expected default, normal:STD, uniform:LO:HI, constant:V, xavier[:GAIN], xavier_uniform[:GAIN], he[:A], he_uniform[:A], lecun or orthogonal[:GAIN]",
                ))
            }
        })
    }

    /// The standard deviation this scheme gives a weight of this shape (None for orthogonal,
    /// whose entries have std `gain / sqrt(max(rows, cols))` only approximately).
    pub fn std(&self, shape: &[usize]) -> Option<f64> {
        let (fi, fo) = fans(shape);
        self.std_with_fan(fi, fo)
    }

    fn std_with_fan(&self, fi: usize, fo: usize) -> Option<f64> {
        let (fi, fo) = (fi as f64, fo as f64);
        let kaiming = |a: f32, fan: Fan| {
            let n = if fan == Fan::In { fi } else { fo };
            (2.0 / ((1.0 + (a as f64).powi(2)) * n)).sqrt()
        };
        Some(match *self {
            Init::Constant(_) => 0.0,
            Init::Normal { std, .. } => std as f64,
            Init::Uniform { low, high } => (high - low) as f64 / 12f64.sqrt(),
            Init::XavierNormal { gain } | Init::XavierUniform { gain } => {
                gain as f64 * (2.0 / (fi + fo)).sqrt()
            }
            Init::KaimingNormal { a, fan } | Init::KaimingUniform { a, fan } => kaiming(a, fan),
            Init::LeCunNormal => 1.0 / fi.sqrt(),
            Init::PyTorchDefault => 1.0 / (3.0 * fi).sqrt(),
            Init::Orthogonal { .. } => return None,
        })
    }

    /// Sample a tensor of `shape` with fans computed from `shape`.
    pub fn sample(&self, shape: &[usize], rng: &mut Rng) -> Tensor {
        let (fi, fo) = fans(shape);
        self.sample_with_fan(shape, fi, fo, rng)
    }

    /// Sample with explicit fans (a bias takes its weight's fans).
    pub fn sample_with_fan(
        &self,
        shape: &[usize],
        fan_in: usize,
        fan_out: usize,
        rng: &mut Rng,
    ) -> Tensor {
        let n: usize = shape.iter().product();
        let std = self.std_with_fan(fan_in, fan_out);
        let bound = std.map(|s| s * 3f64.sqrt()).unwrap_or(0.0);
        let data: Vec<f32> = match *self {
            Init::Constant(c) => vec![c; n],
            Init::Normal { mean, std } => (0..n)
                .map(|_| (mean as f64 + std as f64 * rng.normal()) as f32)
                .collect(),
            Init::Uniform { low, high } => (0..n)
                .map(|_| rng.uniform(low as f64, high as f64) as f32)
                .collect(),
            Init::XavierNormal { .. } | Init::KaimingNormal { .. } | Init::LeCunNormal => {
                let s = std.unwrap();
                (0..n).map(|_| (s * rng.normal()) as f32).collect()
            }
            Init::XavierUniform { .. } | Init::KaimingUniform { .. } | Init::PyTorchDefault => {
                (0..n).map(|_| rng.uniform(-bound, bound) as f32).collect()
            }
            Init::Orthogonal { gain } => orthogonal(shape, gain, rng),
        };
        Tensor::from_host(shape, data, Device::Cpu).expect("length matches shape")
    }
}

/// A (semi-)orthogonal `rows x cols` matrix (rows = shape[0]): QR of a Gaussian matrix by
/// modified Gram–Schmidt in f64, signs fixed by the diagonal of R so the result is uniformly
/// distributed (Mezzadri 2007).
fn orthogonal(shape: &[usize], gain: f32, rng: &mut Rng) -> Vec<f32> {
    let rows = shape.first().copied().unwrap_or(1);
    let cols: usize = shape.iter().skip(1).product::<usize>().max(1);
    // Orthonormalize the longer side's vectors: work on the transpose when rows > cols.
    let (m, n) = if rows < cols {
        (rows, cols)
    } else {
        (cols, rows)
    };
    // m vectors of length n, orthonormal.
    let mut q: Vec<Vec<f64>> = (0..m)
        .map(|_| (0..n).map(|_| rng.normal()).collect())
        .collect();
    for i in 0..m {
        let (done, rest) = q.split_at_mut(i);
        let qi = &mut rest[0];
        for qj in done.iter() {
            let d: f64 = qi.iter().zip(qj).map(|(a, b)| a * b).sum();
            qi.iter_mut().zip(qj).for_each(|(x, y)| *x -= d * y);
        }
        // Dividing by the norm makes R's diagonal positive, which fixes the signs.
        let norm = qi.iter().map(|x| x * x).sum::<f64>().sqrt();
        qi.iter_mut().for_each(|x| *x /= norm);
    }
    let mut out = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let v = if rows < cols { q[r][c] } else { q[c][r] };
            out[r * cols + c] = (gain as f64 * v) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_of(t: &Tensor) -> f64 {
        let v = t.to_vec();
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
    }

    #[test]
    fn fans_match_pytorch() {
        assert_eq!(fans(&[512, 784]), (784, 512));
        assert_eq!(fans(&[64, 32, 3, 3]), (288, 576));
    }

    #[test]
    fn sampled_std_matches_formula() {
        let mut rng = Rng::new(0);
        let shape = [400, 300];
        let cases = [
            (
                Init::KaimingNormal {
                    a: 0.0,
                    fan: Fan::In,
                },
                (2.0f64 / 300.0).sqrt(),
            ),
            (
                Init::KaimingUniform {
                    a: 0.25,
                    fan: Fan::In,
                },
                (2.0 / (1.0625 * 300.0f64)).sqrt(),
            ),
            (
                Init::KaimingNormal {
                    a: 0.0,
                    fan: Fan::Out,
                },
                (2.0f64 / 400.0).sqrt(),
            ),
            (Init::XavierNormal { gain: 1.0 }, (2.0f64 / 700.0).sqrt()),
            (Init::XavierUniform { gain: 1.0 }, (2.0f64 / 700.0).sqrt()),
            (Init::LeCunNormal, (1.0f64 / 300.0).sqrt()),
            (
                Init::Normal {
                    mean: 0.0,
                    std: 0.01,
                },
                0.01,
            ),
            (Init::PyTorchDefault, 1.0 / (3.0f64 * 300.0).sqrt()),
        ];
        for (init, want) in cases {
            let got = std_of(&init.sample(&shape, &mut rng));
            // 120,000 samples: the std estimate's relative error is ~0.2%.
            assert!(
                (got / want - 1.0).abs() < 0.01,
                "{init:?}: std {got}, want {want}"
            );
            assert!((init.std(&shape).unwrap() / want - 1.0).abs() < 1e-6); // f32 hyperparameters
        }
    }

    #[test]
    fn he_is_not_the_lecture_typo() {
        // The slide divides by sqrt(2/fan_in), giving std sqrt(fan_in/2) = 15.8 for fan_in 500.
        let s = Init::KaimingNormal {
            a: 0.0,
            fan: Fan::In,
        }
        .std(&[500, 500])
        .unwrap();
        assert!((s - (2.0f64 / 500.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn orthogonal_rows_or_columns_are_orthonormal() {
        let mut rng = Rng::new(3);
        for (r, c) in [(4, 9), (9, 4), (5, 5)] {
            let w = Init::Orthogonal { gain: 1.0 }
                .sample(&[r, c], &mut rng)
                .to_vec();
            // W W^T = I when r <= c, W^T W = I otherwise.
            let (m, n, at): (usize, usize, Box<dyn Fn(usize, usize) -> f32>) = if r <= c {
                (r, c, Box::new(|i, k| w[i * c + k]))
            } else {
                (c, r, Box::new(|i, k| w[k * c + i]))
            };
            for i in 0..m {
                for j in 0..m {
                    let d: f32 = (0..n).map(|k| at(i, k) * at(j, k)).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-5, "{r}x{c}: <{i},{j}> = {d}");
                }
            }
        }
    }

    #[test]
    fn gains() {
        assert!((gain("leaky_relu", 0.0).unwrap() - 2f32.sqrt()).abs() < 1e-7);
        assert!((gain("tanh", 0.0).unwrap() - 5.0 / 3.0).abs() < 1e-7);
        assert!(gain("swoosh", 0.0).is_err());
    }
}
