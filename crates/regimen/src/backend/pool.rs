//! The buffer pool behind every device's allocations.
//!
//! A training step allocates the same buffers in the same order every time: the activations
//! that forward caches, the gradients backward returns, scratch for convolutions. Instead of
//! asking the system (or the CUDA driver) for memory at each operation, a backend takes a free
//! buffer of the exact size from its pool and gives it back when the tensor that held it is
//! dropped. After the first step, a steady-state step allocates nothing new: `fresh` stops
//! growing, which `tests/allocation.rs` checks. On the GPU this is also what lets a whole step
//! be captured as a CUDA graph (no allocation calls inside the capture).
//!
//! Buffers are keyed by their exact size in 4-byte words (the shapes of a step repeat
//! exactly). The pool keeps at most `limit` bytes of free buffers; beyond that a returned
//! buffer is freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Allocation counters of one device's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers obtained from the system (or driver): the count that a steady state keeps still.
    pub fresh: u64,
    /// Buffers handed out again from the pool.
    pub reused: u64,
    /// Bytes currently held free in the pool.
    pub pooled_bytes: usize,
}

pub struct Pool<B> {
    free: Mutex<HashMap<usize, Vec<B>>>,
    pooled: AtomicUsize,
    fresh: AtomicU64,
    reused: AtomicU64,
    limit: usize,
}

impl<B> Pool<B> {
    pub fn new(limit: usize) -> Pool<B> {
        Pool {
            free: Mutex::new(HashMap::new()),
            pooled: AtomicUsize::new(0),
            fresh: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            limit,
        }
    }

    /// A free buffer of `words` 4-byte words, if the pool has one.
    pub fn take(&self, words: usize) -> Option<B> {
        let b = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&words)
            .and_then(Vec::pop);
        match b {
            Some(_) => {
                self.reused.fetch_add(1, Ordering::Relaxed);
                self.pooled.fetch_sub(words * 4, Ordering::Relaxed);
            }
            None => {
                self.fresh.fetch_add(1, Ordering::Relaxed);
            }
        }
        b
    }

    /// Keep `b` (of `words` words) for reuse; gives it back when the pool is full, for the
    /// caller to free.
    pub fn put(&self, words: usize, b: B) -> Option<B> {
        let bytes = words * 4;
        if self.pooled.load(Ordering::Relaxed) + bytes > self.limit {
            return Some(b);
        }
        self.pooled.fetch_add(bytes, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(words)
            .or_default()
            .push(b);
        None
    }

    /// Remove every free buffer (for the caller to free).
    pub fn drain(&self) -> Vec<B> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        self.pooled.store(0, Ordering::Relaxed);
        free.drain().flat_map(|(_, v)| v).collect()
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            fresh: self.fresh.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            pooled_bytes: self.pooled.load(Ordering::Relaxed),
        }
    }
}
