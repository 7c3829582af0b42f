//! Host reads: counted, and refused in strict mode.
//!
//! A training step must not wait for the device: on a GPU a read back to the host stalls the
//! pipeline and cannot be captured in a CUDA graph. Every backend's download (the only way a
//! value reaches the host: [`crate::Tensor::to_vec`], [`crate::Tensor::item`],
//! [`crate::Indices::to_vec`]) goes through [`note_host_read`]. [`set_strict`] makes such a
//! read panic with the reason, so a test can run whole training steps under it and show that
//! nothing inside them reads the device; [`host_reads`] counts the reads of this thread.
//! Both are per thread, so tests running in parallel do not see each other.

use std::cell::Cell;

thread_local! {
    static STRICT: Cell<bool> = const { Cell::new(false) };
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Refuse (panic on) host reads on this thread while `on`.
pub fn set_strict(on: bool) {
    STRICT.with(|s| s.set(on));
}

pub fn is_strict() -> bool {
    STRICT.with(|s| s.get())
}

/// Host reads made by this thread so far.
pub fn host_reads() -> u64 {
    READS.with(|r| r.get())
}

/// Called by every backend before it copies device values to the host.
pub fn note_host_read(what: &str) {
    READS.with(|r| r.set(r.get() + 1));
    if is_strict() {
        panic!("host read of {what} in strict mode (a training step must not read the device)");
    }
}
