#![doc = include_str!("../../../README.md")]
// `!(x > 0.0)` is how validation rejects NaN along with the out-of-range values.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
//! regimen: train neural networks natively in Rust.
//!
//! Layers with explicit `forward(x, mode)` / `backward(dy)` ([`Layer`]), a device-agnostic
//! [`Tensor`] over a [`backend::Backend`] (CPU: `gemm` + `rayon`), the losses, weight
//! initialization, and a finite-difference [`gradcheck`] for every layer, yours included.
//! See `ARCHITECTURE.md` for the layout and the data flow of a training step.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod ensemble;
pub mod error;
pub mod gradcheck;
pub mod init;
pub mod io;
pub mod layer;
pub mod layers;
mod linalg;
pub mod loss;
pub mod models;
pub mod optim;
pub mod png;
pub mod rng;
pub mod run_state;
pub mod schedule;
pub mod tensor;
pub mod tensorboard;
pub mod train;
pub mod trainer;

pub use backend::{Target, Unary};
pub use error::{Error, Result};
pub use gradcheck::GradCheck;
pub use init::{Fan, Init};
pub use layer::{Ctx, Layer, Mode, Param, ParamKind, Precision};
pub use rng::Rng;
pub use run_state::RunState;
pub use tensor::{DType, Device, Indices, Tensor};

/// Run `f` on a thread of the compute pool (rayon's global pool) and return its result; called
/// from a thread of the pool, just run it.
///
/// A training step starts dozens of short parallel loops. Started from a thread outside the
/// pool (`main`), each loop is handed to the pool while the caller sleeps until it ends: a
/// sleep and a wake-up per loop, which cost mlp-step (batch 128, 2 cores) 15% of its time.
/// Started from a thread of the pool, the caller does its share of each loop and the other
/// threads are still awake. The `regimen` program runs every command this way; a program that
/// trains from its own `main` should do the same.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::join(f, || ()).0
}

/// Set the number of CPU threads (once, before any parallel work; later calls are ignored).
pub fn set_threads(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global();
}
