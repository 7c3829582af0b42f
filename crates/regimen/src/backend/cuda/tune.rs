//! `REGIMEN_CONV=auto`: each f32 convolution shape and direction (forward, input gradient,
//! weight gradient) is timed on its first use with every engine that takes it (im2col +
//! cuBLAS, the four implicit-GEMM kernels of `conv.cu`, cuDNN when it loads and has a plan;
//! `CudaBackend::tune` runs the trials), and runs from then on with the fastest, as
//! `torch.backends.cudnn.benchmark` does for cuDNN's algorithms. The engines differ in the order of their sums, so under `auto` two
//! processes may round differently (each process stays the same from step to step: a choice
//! is made once). The timings are kept as one line per shape and direction
//! (`CudaBackend::conv_plans`, printed by `bench --profile`).
//!
//! The timing itself needs a GPU; what is here without one (the rule that picks, the lines)
//! is held by the unit tests below.

use std::fmt::Write as _;

/// Who computes one direction of a convolution.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(super) enum Engine {
    /// The column matrix, then one cuBLAS product (and col2im for the input gradient).
    Im2col,
    /// `conv.cu`'s kernels: 32 x 256 tiles with `m32` (64 x 128 otherwise), 32 reduction
    /// steps staged per barrier with `k32` (8 otherwise).
    Implicit { m32: bool, k32: bool },
    /// cuDNN's algorithm for the shape (`dnn.rs`).
    Cudnn,
}

impl Engine {
    /// The implicit-GEMM kernels' choice without timing: 32-row tiles for products of at
    /// most 32 rows (a 64-row tile would be half empty), 8 staged steps.
    pub(super) fn implicit_for(rows: usize) -> Engine {
        Engine::Implicit {
            m32: rows <= 32,
            k32: false,
        }
    }

    /// Every engine to time, in the order they are tried (and preferred on a tie).
    pub(super) fn candidates(implicit: bool, cudnn: bool) -> Vec<Engine> {
        let mut v = vec![Engine::Im2col];
        if implicit {
            for k32 in [false, true] {
                for m32 in [false, true] {
                    v.push(Engine::Implicit { m32, k32 });
                }
            }
        }
        if cudnn {
            v.push(Engine::Cudnn);
        }
        v
    }

    pub(super) fn name(self) -> String {
        match self {
            Engine::Im2col => "im2col".into(),
            Engine::Implicit { m32, k32 } => format!(
                "implicit {}/{}",
                if m32 { "32x256" } else { "64x128" },
                if k32 { 32 } else { 8 }
            ),
            Engine::Cudnn => "cudnn".into(),
        }
    }
}

/// A convolution's direction.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(super) enum Dir {
    Forward,
    InputGrad,
    WeightGrad,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Forward => "forward",
            Dir::InputGrad => "input gradient",
            Dir::WeightGrad => "weight gradient",
        }
    }
}

/// A convolution shape as the tuner keys it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(super) struct Key {
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub stride: usize,
    pub pad: usize,
    pub tf32: bool,
}

/// What a timed engine gave: milliseconds per run, or why it could not run.
pub(super) type Timing = std::result::Result<f64, String>;

/// The fastest engine of `times` (the first of equals; `None` when none ran).
pub(super) fn fastest(times: &[(Engine, Timing)]) -> Option<Engine> {
    let mut best: Option<(Engine, f64)> = None;
    for (e, t) in times {
        if let Ok(ms) = t {
            if ms.is_finite() && best.is_none_or(|(_, b)| *ms < b) {
                best = Some((*e, *ms));
            }
        }
    }
    best.map(|(e, _)| e)
}

/// The line kept for one tuned shape and direction: the shape, each engine's time (or why it
/// could not run), and the choice.
pub(super) fn line(key: &Key, dir: Dir, times: &[(Engine, Timing)], chosen: Engine) -> String {
    let mut s = format!(
        "auto x {:?} w {:?} stride {} pad {}{}, {}:",
        key.x,
        key.w,
        key.stride,
        key.pad,
        if key.tf32 { " tf32" } else { "" },
        dir.name()
    );
    for (i, (e, t)) in times.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        match t {
            Ok(ms) => write!(s, "{sep}{} {ms:.4} ms", e.name()),
            Err(why) => write!(s, "{sep}{} failed ({why})", e.name()),
        }
        .expect("writing to a String");
    }
    write!(s, " -> {}", chosen.name()).expect("writing to a String");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Engine = Engine::Implicit {
        m32: true,
        k32: true,
    };

    #[test]
    fn the_fastest_engine_that_ran_is_chosen() {
        let t = [
            (Engine::Im2col, Ok(0.30)),
            (A, Ok(0.12)),
            (Engine::Cudnn, Err("no plan".to_string())),
        ];
        assert_eq!(fastest(&t), Some(A));
        let t = [
            (Engine::Im2col, Ok(0.10)),
            (A, Ok(0.10)),
            (Engine::Cudnn, Ok(0.09)),
        ];
        assert_eq!(fastest(&t), Some(Engine::Cudnn));
        // A tie keeps the earlier engine; a non-finite time never wins; nothing ran: none.
        let t = [(Engine::Im2col, Ok(0.10)), (A, Ok(0.10))];
        assert_eq!(fastest(&t), Some(Engine::Im2col));
        let t = [(Engine::Im2col, Ok(f64::NAN)), (A, Ok(0.5))];
        assert_eq!(fastest(&t), Some(A));
        assert_eq!(fastest(&[(Engine::Cudnn, Err("x".into()))]), None);
        assert_eq!(fastest(&[]), None);
    }

    #[test]
    fn candidates_cover_every_engine_that_takes_the_shape() {
        assert_eq!(Engine::candidates(false, false), vec![Engine::Im2col]);
        let all = Engine::candidates(true, true);
        assert_eq!(all.len(), 6);
        assert_eq!(all[0], Engine::Im2col);
        assert_eq!(all[5], Engine::Cudnn);
        for m32 in [false, true] {
            for k32 in [false, true] {
                assert!(all.contains(&Engine::Implicit { m32, k32 }));
            }
        }
        assert_eq!(
            Engine::candidates(false, true),
            [Engine::Im2col, Engine::Cudnn]
        );
        assert_eq!(
            Engine::implicit_for(32),
            Engine::Implicit {
                m32: true,
                k32: false
            }
        );
        assert_eq!(
            Engine::implicit_for(33),
            Engine::Implicit {
                m32: false,
                k32: false
            }
        );
    }

    #[test]
    fn a_tuning_line_names_the_shape_every_time_and_the_choice() {
        let key = Key {
            x: [128, 32, 28, 28],
            w: [32, 32, 3, 3],
            stride: 1,
            pad: 1,
            tf32: true,
        };
        let t = [
            (Engine::Im2col, Ok(0.25)),
            (A, Ok(0.0812345)),
            (Engine::Cudnn, Err("no plan".to_string())),
        ];
        assert_eq!(
            line(&key, Dir::WeightGrad, &t, A),
            "auto x [128, 32, 28, 28] w [32, 32, 3, 3] stride 1 pad 1 tf32, weight gradient: \
             im2col 0.2500 ms, implicit 32x256/32 0.0812 ms, cudnn failed (no plan) -> \
             implicit 32x256/32"
        );
    }
}
