//! Seeded, reproducible randomness.
//!
//! regimen uses its own small generators instead of `rand`: the same seed must give the same
//! numbers on every run, every platform and every crate version, and the random masks of dropout
//! and stochastic depth must be reproducible on the GPU, where a kernel draws element `i` of a
//! mask from `(seed, i)` alone. Two generators:
//!
//! - [`Rng`]: a sequential SplitMix64 stream (Steele, Lea & Flood 2014) for initialization and
//!   shuffling. Normal samples use the Box–Muller transform.
//! - [`hash_uniform`]: a counter-based generator: the SplitMix64 finalizer of `seed` and `index`,
//!   so element `i` of a mask needs no state and any device can compute it in parallel.

/// The SplitMix64 output function: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A uniform number in `[0, 1)` determined by `(seed, index)` alone (24 bits of precision).
#[inline]
pub fn hash_uniform(seed: u64, index: u64) -> f32 {
    let h = mix64(seed ^ mix64(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// A sequential seeded generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: mix64(seed ^ GOLDEN),
        }
    }

    /// An independent generator derived from this one (for a child layer, a worker thread...).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    #[inline]
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Standard normal sample (Box–Muller; one of the pair is discarded to keep the stream simple).
    #[inline]
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Gamma(shape, 1) sample (Marsaglia & Tsang, 2000; for shape < 1, `G(a + 1) U^(1/a)`).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.next_f64(); // (0, 1]
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.next_f64();
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    /// Beta(a, b) sample: `X / (X + Y)` with `X ~ Gamma(a)`, `Y ~ Gamma(b)`.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y == 0.0 {
            return 0.5;
        }
        x / (x + y)
    }

    /// Uniform integer in `[0, n)` (n > 0), without modulo bias worth caring about for n < 2^32.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_moments_are_right() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 1/sqrt(n) = 0.0022 for the mean, sqrt(2/n) = 0.0032 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "var {var}");
        let us: Vec<f32> = (0..n as u64).map(|i| hash_uniform(3, i)).collect();
        let m = us.iter().map(|&u| u as f64).sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 0.003, "hash_uniform mean {m}");
        assert!(us.iter().all(|&u| (0.0..1.0).contains(&u)));
        assert_ne!(hash_uniform(3, 5), hash_uniform(4, 5));
    }

    #[test]
    fn beta_has_the_right_mean_and_variance() {
        let mut r = Rng::new(4);
        for (a, b) in [(0.2, 0.2), (1.0, 1.0), (2.0, 5.0)] {
            let n = 100_000;
            let xs: Vec<f64> = (0..n).map(|_| r.beta(a, b)).collect();
            let m = xs.iter().sum::<f64>() / n as f64;
            let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
            let (wm, wv) = (a / (a + b), a * b / ((a + b).powi(2) * (a + b + 1.0)));
            assert!(
                (m - wm).abs() < 0.005 && (v - wv).abs() < 0.005,
                "Beta({a},{b}): mean {m} var {v}, want {wm} {wv}"
            );
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..50).collect();
        Rng::new(2).shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
