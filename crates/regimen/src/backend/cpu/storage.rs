//! CPU storage: a buffer of 4-byte words from the CPU pool, viewed as `f32`, `u32` or 16-bit
//! elements according to the tensor's [`DType`]. Dropping it returns the words to the pool.

use std::sync::LazyLock;

use crate::backend::pool::Pool;
use crate::tensor::{DType, Storage, Tensor};

/// Free CPU buffers kept for reuse: at most 2 GiB.
pub(super) static POOL: LazyLock<Pool<Vec<u32>>> = LazyLock::new(|| Pool::new(2 << 30));

#[derive(Debug)]
pub struct CpuBuffer {
    words: Vec<u32>,
    /// Statistics of the contents that their writer left ([`set_block_stats`]); cleared by
    /// any mutable access, so they always describe the words as they are.
    stats: Option<Box<BlockStats>>,
}

/// Each contiguous block of `inner` values' `(count, mean, sum of squared deviations)`, as
/// batch norm computes them ([`super::norm::block_stats`]).
#[derive(Debug)]
pub struct BlockStats {
    pub inner: usize,
    pub blocks: Vec<(f64, f64, f64)>,
}

impl CpuBuffer {
    /// `words` words from the pool (or fresh, zeroed); contents unspecified.
    pub(super) fn uninit(words: usize) -> CpuBuffer {
        if words == 0 {
            // No memory: not the pool's business.
            return CpuBuffer {
                words: Vec::new(),
                stats: None,
            };
        }
        let words = POOL.take(words).unwrap_or_else(|| vec![0; words]);
        CpuBuffer { words, stats: None }
    }

    pub(super) fn words(&self) -> &[u32] {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut [u32] {
        self.stats = None;
        &mut self.words
    }
}

impl Clone for CpuBuffer {
    fn clone(&self) -> CpuBuffer {
        let mut b = CpuBuffer::uninit(self.words.len());
        b.words.copy_from_slice(&self.words);
        b
    }
}

/// Leave the statistics of `t`'s blocks of `inner` values with it (its writer computed them
/// while the values were in cache). They hold until the tensor's storage is next written.
pub fn set_block_stats(t: &mut Tensor, inner: usize, blocks: Vec<(f64, f64, f64)>) {
    buffer_mut(t).stats = Some(Box::new(BlockStats { inner, blocks }));
}

/// The statistics of `t`'s blocks of `inner` values, when its writer left them.
pub fn block_stats(t: &Tensor, inner: usize) -> Option<&[(f64, f64, f64)]> {
    match &buffer(t).stats {
        Some(s) if s.inner == inner && s.blocks.len() * inner == t.numel() => Some(&s.blocks),
        _ => None,
    }
}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        if !words.is_empty() {
            // A full pool hands the buffer back, and it is freed here.
            drop(POOL.put(words.len(), words));
        }
    }
}

/// Words needed for `n` elements of `dtype`.
fn words_for(n: usize, dtype: DType) -> usize {
    (n * dtype.size()).div_ceil(4)
}

fn buffer(t: &Tensor) -> &CpuBuffer {
    match t.storage() {
        Storage::Cpu(b) => b,
        #[allow(unreachable_patterns)]
        _ => panic!("a {} tensor reached the CPU backend", t.device()),
    }
}

fn buffer_mut(t: &mut Tensor) -> &mut CpuBuffer {
    let device = t.device();
    match t.storage_mut() {
        Storage::Cpu(b) => b,
        #[allow(unreachable_patterns)]
        _ => panic!("a {device} tensor reached the CPU backend"),
    }
}

// SAFETY (all casts below): a `Vec<u32>` is 4-byte aligned, which covers f32 (4), and u16,
// bf16, f16 (2); every bit pattern is a valid value of each of these types; the lengths are
// within the buffer (`words_for` rounds up).

/// The `f32` elements of an `f32` tensor.
pub fn f32s(t: &Tensor) -> &[f32] {
    assert_eq!(
        t.dtype(),
        DType::F32,
        "the CPU backend expected an f32 tensor"
    );
    let w = buffer(t).words();
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, t.numel()) }
}

pub fn f32s_mut(t: &mut Tensor) -> &mut [f32] {
    assert_eq!(
        t.dtype(),
        DType::F32,
        "the CPU backend expected an f32 tensor"
    );
    let n = t.numel();
    let w = buffer_mut(t).words_mut();
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut f32, n) }
}

pub fn u32s(t: &Tensor) -> &[u32] {
    assert_eq!(
        t.dtype(),
        DType::U32,
        "the CPU backend expected a u32 tensor"
    );
    &buffer(t).words()[..t.numel()]
}

pub fn u32s_mut(t: &mut Tensor) -> &mut [u32] {
    assert_eq!(
        t.dtype(),
        DType::U32,
        "the CPU backend expected a u32 tensor"
    );
    let n = t.numel();
    &mut buffer_mut(t).words_mut()[..n]
}

/// The 16-bit patterns of a `bf16` or `f16` tensor.
pub fn u16s(t: &Tensor) -> &[u16] {
    assert_eq!(
        t.dtype().size(),
        2,
        "the CPU backend expected a 16-bit tensor"
    );
    let w = buffer(t).words();
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, t.numel()) }
}

pub fn u16s_mut(t: &mut Tensor) -> &mut [u16] {
    assert_eq!(
        t.dtype().size(),
        2,
        "the CPU backend expected a 16-bit tensor"
    );
    let n = t.numel();
    let w = buffer_mut(t).words_mut();
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u16, n) }
}

/// A host vector of `n` values from the CPU pool (contents unspecified): fill it and give it
/// to [`Tensor::from_host`], which on the CPU adopts it without a copy; its memory returns to
/// the pool when the tensor is dropped. The loader builds its batches in these, so that a
/// steady run neither copies a batch twice nor touches fresh pages.
pub fn host_vec(n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let mut words = std::mem::ManuallyDrop::new(POOL.take(n).unwrap_or_else(|| vec![0; n]));
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is an f32;
    // the vector's allocation is handed over whole.
    unsafe {
        Vec::from_raw_parts(
            words.as_mut_ptr() as *mut f32,
            words.len(),
            words.capacity(),
        )
    }
}

/// An `f32` tensor that takes `v` as its storage, without a copy (`v.len()` elements).
pub(super) fn adopt_f32(shape: &[usize], v: Vec<f32>) -> Tensor {
    debug_assert_eq!(shape.iter().product::<usize>(), v.len());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: as in `host_vec`, the other way.
    let words = unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut u32, v.len(), v.capacity()) };
    Tensor::from_parts(
        shape,
        DType::F32,
        Storage::Cpu(CpuBuffer { words, stats: None }),
    )
}

/// A new CPU tensor from the pool (contents unspecified).
pub fn alloc(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_parts(
        shape,
        dtype,
        Storage::Cpu(CpuBuffer::uninit(words_for(n, dtype))),
    )
}
