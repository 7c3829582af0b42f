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
/// Started from a thread of the pool, the caller does its share of each loop, and the pool's
/// other threads stay awake while `f` runs (they nap after 2 ms without work): rayon would put
/// them to sleep between loops and wake them again (another 8-10% of that step). The `regimen`
/// program runs every command this way; a program that trains from its own `main` should do the
/// same.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::join(
        || {
            let done = std::sync::atomic::AtomicBool::new(false);
            let mut out = None;
            rayon::scope(|s| {
                for _ in 1..rayon::current_num_threads() {
                    s.spawn(|_| keep_awake(&done));
                }
                // Set even when `f` panics, so that the helpers end and the panic goes on.
                let _done = SetOnDrop(&done);
                out = Some(f());
            });
            out.expect("set in the scope")
        },
        || (),
    )
    .0
}

struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Run the pool's work on this thread until `done`, without going to sleep between jobs while
/// jobs keep coming (rayon puts an idle thread to sleep and wakes it for the next loop; a step's
/// loops come microseconds apart). After 2 ms without work it naps in steps of 100 us, giving
/// the core to other threads (the data loader), after 50 ms in steps of 2 ms, until work comes
/// again; a loop that starts while it naps runs on the other threads.
fn keep_awake(done: &std::sync::atomic::AtomicBool) {
    use std::time::{Duration, Instant};
    let mut idle_since = Instant::now();
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            // Idle for long (a command waiting on files or child processes): naps of 2 ms.
            _ if idle_since.elapsed() > Duration::from_millis(50) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            _ if idle_since.elapsed() > Duration::from_millis(2) => {
                std::thread::sleep(Duration::from_micros(100))
            }
            _ => std::hint::spin_loop(),
        }
    }
}

/// Set the number of CPU threads (once, before any parallel work; later calls are ignored).
pub fn set_threads(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global();
}

#[cfg(test)]
mod tests {
    /// `on_pool` returns `f`'s value, runs it on a thread of the pool, and a panic in `f`
    /// reaches the caller (the helpers kept awake end instead of waiting forever).
    #[test]
    fn on_pool_runs_on_the_pool_and_passes_panics_on() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // From a thread outside any pool, with the global pool; and inside `pool`, where it
        // just runs.
        assert!(super::on_pool(|| rayon::current_thread_index().is_some()));
        assert_eq!(pool.install(|| super::on_pool(|| 7)), 7);
        let caught = std::thread::spawn(|| super::on_pool(|| -> u32 { panic!("inside") })).join();
        assert!(caught.is_err(), "the panic reached the caller");
        // The pool still works afterwards.
        assert_eq!(super::on_pool(|| (0..100u64).sum::<u64>()), 4950);
    }
}
