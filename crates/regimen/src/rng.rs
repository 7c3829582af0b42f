//! Seeded, reproducible randomness: one scheme for everything that is drawn during training.
//!
//! regimen uses its own small generators instead of `rand`: the same seed must give the same
//! numbers on every run, every platform, every crate version and every device. Two generators:
//!
//! - [`Rng`]: a sequential SplitMix64 stream (Steele, Lea & Flood 2014), for what happens once
//!   on the host before training: weight initialization, the per-epoch shuffle, splits. Normal
//!   samples use the Box–Muller transform. [`Rng::philox`] gives the same interface over a
//!   Philox stream, for sequential draws during training (the host loader's augmentations).
//! - [`philox`]: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
//!   SC 2011), the counter-based generator of cuRAND and of PyTorch's CUDA generator, for
//!   everything drawn *during* a training step: dropout masks, stochastic depth, fractional
//!   pooling regions, augmentation draws. A counter-based generator has no state: the numbers
//!   are a pure function of a key and a counter, so any element can be computed alone, in
//!   parallel, by any device, and a captured GPU step stays valid when the step changes (the
//!   step is read from device memory).
//!
//! ## The key and the counter
//!
//! A draw is identified by `(stream, step, purpose, index)`:
//!
//! - `stream`: a 64-bit key of the consumer, the run's seed mixed with the consumer's position
//!   in the model (`Sequential` gives child `i` the key `mix64(seed ^ mix64(i + 1))`, and so on
//!   down the tree, see [`crate::Layer::reseed`]); it is Philox's key `[lo, hi]`.
//! - `step`: the training step (the optimizer's update count, read by kernels from the device
//!   step counter), so each step draws fresh numbers.
//! - `purpose`: which kind of draw ([`purpose`]), so that two uses within one consumer
//!   never share numbers.
//! - `index`: the element (or sample) index.
//!
//! Who draws what: dropout masks `(layer, step, DROPOUT, element)`; stochastic depth
//! `(layer, step, STOCHASTIC_DEPTH, sample)`; fractional pooling `(layer, step,
//! FRACTIONAL_POOL, 2 plane + axis)`; the on-device batch gather
//! `(run, step, AUGMENT, 4 sample + k)` for crop offsets (k = 0, 1) and the flip (k = 2), and
//! its later steps under purpose `AUGMENT_STEP + k` for the `k`-th of them: a per-image step
//! reads, for sample `i`, the stream `(mix64(run ^ mix64(i + 1)), step, AUGMENT_STEP + k)`
//! sequentially through [`Rng::philox`], as the host pipeline reads its numbers for one image;
//! a Mixup's or CutMix's `l` and box come from `(run, step, AUGMENT_STEP + k)` the same way; the
//! host loader's augmentations read
//! `(run, global batch index, AUGMENT, ...)` sequentially through [`Rng::philox`] (Mixup's
//! Beta draws need a variable number of numbers).
//!
//! Philox's 4-word counter is `[index / 4 (low word), index / 4 (high word), step, purpose]`;
//! the 4 output words serve elements `4 (index / 4) .. 4 (index / 4) + 3`, word `index % 4`
//! for element `index`. A uniform number in `[0, 1)` takes the top 24 bits of the word:
//! `(w >> 8) * 2^-24`. The CUDA kernels implement exactly this (`backend/cuda/kernels.cu`),
//! and `tests/` check that both devices draw the same masks.

/// Kinds of draws (the counter's last word).
pub mod purpose {
    pub const DROPOUT: u32 = 1;
    pub const STOCHASTIC_DEPTH: u32 = 2;
    pub const FRACTIONAL_POOL: u32 = 3;
    pub const AUGMENT: u32 = 4;
    /// The on-device batch steps after the gather (every augmentation but a leading crop and
    /// flip): step `k` of them (0-based) draws under purpose `AUGMENT_STEP + k`.
    pub const AUGMENT_STEP: u32 = 0x100;
}

/// The SplitMix64 output function: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four 32-bit words from a 4-word counter and a 2-word key.
#[inline]
pub fn philox(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = PHILOX_M0 as u64 * c[0] as u64;
        let p1 = PHILOX_M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The four words of the block that holds element `index` (see the module doc).
#[inline]
pub fn philox_block(stream: u64, step: u32, purpose: u32, index: u64) -> [u32; 4] {
    let block = index / 4;
    philox(
        [block as u32, (block >> 32) as u32, step, purpose],
        [stream as u32, (stream >> 32) as u32],
    )
}

/// Draw `j` of 64 bits of `(stream, step, purpose)`: the words `2j` (high) and `2j + 1` (low),
/// as [`Rng::philox`] reads them.
#[inline]
pub fn philox_u64(stream: u64, step: u32, purpose: u32, j: u64) -> u64 {
    let w = philox_block(stream, step, purpose, 2 * j);
    let k = ((2 * j) % 4) as usize;
    (w[k] as u64) << 32 | w[k + 1] as u64
}

/// A 64-bit draw as a whole number in `[0, n)`, as [`Rng::below`] maps it.
#[inline]
pub fn u64_below(x: u64, n: usize) -> usize {
    (((x >> 32) * n as u64) >> 32) as usize
}

/// A word as a uniform number in `[0, 1)` (24 bits).
#[inline]
pub fn word_to_uniform(w: u32) -> f32 {
    (w >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The uniform number in `[0, 1)` of draw `(stream, step, purpose, index)`.
#[inline]
pub fn uniform(stream: u64, step: u32, purpose: u32, index: u64) -> f32 {
    word_to_uniform(philox_block(stream, step, purpose, index)[(index % 4) as usize])
}

/// Fill `out` with the uniform numbers of elements `first..first + out.len()`, four per
/// Philox block. Whole groups of `LANES` blocks are computed side by side, in a loop that the
/// compiler turns into vector multiplies (compiled for AVX-512, AVX2 and the baseline, chosen
/// at run time); the words are the same as one block at a time.
pub fn fill_uniform(stream: u64, step: u32, purpose: u32, first: u64, out: &mut [f32]) {
    let mut i = 0;
    // The head: up to the next block boundary.
    while i < out.len() && !(first + i as u64).is_multiple_of(4) {
        out[i] = uniform(stream, step, purpose, first + i as u64);
        i += 1;
    }
    let whole = (out.len() - i) / (4 * LANES) * (4 * LANES);
    if whole > 0 {
        let groups = Groups {
            key: [stream as u32, (stream >> 32) as u32],
            step,
            purpose,
            first_block: (first + i as u64) / 4,
        };
        fill_groups_dispatch(&groups, &mut out[i..i + whole]);
        i += whole;
    }
    while i < out.len() {
        let index = first + i as u64;
        let words = philox_block(stream, step, purpose, index);
        let mut w = (index % 4) as usize;
        while w < 4 && i < out.len() {
            out[i] = word_to_uniform(words[w]);
            w += 1;
            i += 1;
        }
    }
}

/// Philox blocks computed side by side in [`fill_uniform`].
const LANES: usize = 16;

struct Groups {
    key: [u32; 2],
    step: u32,
    purpose: u32,
    first_block: u64,
}

fn fill_groups_dispatch(g: &Groups, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::backend::cpu::direct::avx512_allowed() && is_x86_feature_detected!("avx512dq") {
            // SAFETY: the features were just detected.
            return unsafe { fill_groups_avx512(g, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { fill_groups_avx2(g, out) };
        }
    }
    fill_groups(g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2")]
unsafe fn fill_groups_avx512(g: &Groups, out: &mut [f32]) {
    fill_groups(g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_groups_avx2(g: &Groups, out: &mut [f32]) {
    fill_groups(g, out)
}

/// `out.len()` is a multiple of `4 * LANES`; block `first_block + j` fills `out[4j..4j + 4]`.
#[inline(always)]
fn fill_groups(g: &Groups, out: &mut [f32]) {
    for (gi, chunk) in out.chunks_exact_mut(4 * LANES).enumerate() {
        let base = g.first_block + (gi * LANES) as u64;
        let mut c0 = [0u32; LANES];
        let mut c1 = [0u32; LANES];
        let mut c2 = [g.step; LANES];
        let mut c3 = [g.purpose; LANES];
        for l in 0..LANES {
            let b = base + l as u64;
            c0[l] = b as u32;
            c1[l] = (b >> 32) as u32;
        }
        let mut k = g.key;
        for round in 0..10 {
            if round > 0 {
                k[0] = k[0].wrapping_add(PHILOX_W0);
                k[1] = k[1].wrapping_add(PHILOX_W1);
            }
            for l in 0..LANES {
                let p0 = PHILOX_M0 as u64 * c0[l] as u64;
                let p1 = PHILOX_M1 as u64 * c2[l] as u64;
                let n0 = (p1 >> 32) as u32 ^ c1[l] ^ k[0];
                let n2 = (p0 >> 32) as u32 ^ c3[l] ^ k[1];
                c1[l] = p1 as u32;
                c3[l] = p0 as u32;
                c0[l] = n0;
                c2[l] = n2;
            }
        }
        for l in 0..LANES {
            chunk[4 * l] = word_to_uniform(c0[l]);
            chunk[4 * l + 1] = word_to_uniform(c1[l]);
            chunk[4 * l + 2] = word_to_uniform(c2[l]);
            chunk[4 * l + 3] = word_to_uniform(c3[l]);
        }
    }
}

/// A sequential seeded generator: SplitMix64 ([`Rng::new`]), or a sequential view of a Philox
/// stream ([`Rng::philox`]).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    /// `Some` for a Philox stream: `(stream key, step, purpose)`; `state` then counts the
    /// 64-bit draws made so far.
    philox: Option<(u64, u32, u32)>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: mix64(seed ^ GOLDEN),
            philox: None,
        }
    }

    /// A sequential view of the Philox draws `(stream, step, purpose, index)`, index 0, 1, 2,
    /// ...: draw `j` of 64 bits is the words `2j` and `2j + 1`. The host loader's augmentations
    /// read their numbers this way, so that every random number drawn during training comes
    /// from the one counter-based scheme of this module.
    pub fn philox(stream: u64, step: u32, purpose: u32) -> Rng {
        Rng {
            state: 0,
            philox: Some((stream, step, purpose)),
        }
    }

    /// An independent generator derived from this one (for a child layer, a worker thread...).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        if let Some((stream, step, purpose)) = self.philox {
            let j = self.state;
            self.state += 1;
            return philox_u64(stream, step, purpose, j);
        }
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
        u64_below(self.next_u64(), n)
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
        let us: Vec<f32> = (0..n as u64).map(|i| uniform(3, 0, 1, i)).collect();
        let m = us.iter().map(|&u| u as f64).sum::<f64>() / n as f64;
        // Standard error of the mean of U[0, 1): sqrt(1/12 / n) = 0.00065.
        assert!((m - 0.5).abs() < 0.003, "uniform mean {m}");
        assert!(us.iter().all(|&u| (0.0..1.0).contains(&u)));
        assert_ne!(uniform(3, 0, 1, 5), uniform(4, 0, 1, 5));
        assert_ne!(
            uniform(3, 0, 1, 5),
            uniform(3, 1, 1, 5),
            "the step changes the draw"
        );
        assert_ne!(
            uniform(3, 0, 1, 5),
            uniform(3, 0, 2, 5),
            "the purpose changes the draw"
        );
    }

    /// Random123's known-answer vectors (`tests/kat_vectors`, the three `philox4x32 10` lines:
    /// counter, key, expected output).
    #[test]
    fn philox_matches_the_random123_known_answers() {
        let cases = [
            (
                [0u32; 4],
                [0u32; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(philox(ctr, key), want, "counter {ctr:08x?} key {key:08x?}");
        }
    }

    #[test]
    fn every_instruction_set_draws_the_same_words() {
        let g = Groups {
            key: [0x9ABC_DEF0, 0x1234_5678],
            step: 7,
            purpose: 3,
            first_block: (1 << 32) - 5,
        };
        let mut want = vec![0.0; 4 * LANES * 3];
        fill_groups(&g, &mut want);
        for (j, &v) in want.iter().enumerate() {
            let index = 4 * g.first_block + j as u64;
            assert_eq!(v, uniform(0x1234_5678_9ABC_DEF0, 7, 3, index), "word {j}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut got = vec![0.0; want.len()];
            if is_x86_feature_detected!("avx2") {
                unsafe { fill_groups_avx2(&g, &mut got) };
                assert_eq!(got, want, "AVX2");
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                unsafe { fill_groups_avx512(&g, &mut got) };
                assert_eq!(got, want, "AVX-512");
            }
        }
    }

    #[test]
    fn fill_uniform_equals_uniform_per_element() {
        // Short and long (the grouped path), aligned and not, and a block counter that crosses
        // 2^32 inside a group.
        let stream = 0x1234_5678_9ABC_DEF0;
        for (first, len) in [
            (3u64, 11usize),
            (0, 64),
            (5, 300),
            (4 * (1 << 32) - 40, 200),
        ] {
            let mut out = vec![0.0; len];
            fill_uniform(stream, 4, 2, first, &mut out);
            for (i, &v) in out.iter().enumerate() {
                let want = uniform(stream, 4, 2, first + i as u64);
                assert_eq!(v, want, "element {i} from {first}");
            }
        }
    }

    #[test]
    fn philox_streams_are_sequences_of_philox_words() {
        let mut r = Rng::philox(77, 5, purpose::AUGMENT);
        for j in 0..6u64 {
            let w = philox_block(77, 5, purpose::AUGMENT, 2 * j);
            let k = ((2 * j) % 4) as usize;
            assert_eq!(
                r.next_u64(),
                (w[k] as u64) << 32 | w[k + 1] as u64,
                "draw {j}"
            );
        }
        let mut a = Rng::philox(77, 6, purpose::AUGMENT);
        let mut b = Rng::philox(77, 5, purpose::AUGMENT);
        assert_ne!(a.next_u64(), b.next_u64(), "another step, other numbers");
        let xs: Vec<f64> = (0..50_000).map(|_| a.normal()).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!(m.abs() < 0.02, "normal mean {m}");
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
