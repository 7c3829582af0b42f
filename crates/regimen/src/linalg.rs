//! Host linear algebra: row-major matrix products on slices through the `gemm` crate. The CPU
//! backend's matrix products and convolutions use it, and so does preprocessing (PCA,
//! whitening), which works on host data before any tensor exists.

use gemm::Parallelism;

/// A row-major matrix operand, possibly read transposed.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    /// Rows and columns of the operand as used (after the transpose).
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            transposed: false,
        }
    }
    /// `data` holds the `cols x rows` matrix whose transpose is used.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            transposed: true,
        }
    }
    /// (row stride, column stride) of the operand as used.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// The parallelism to give one matrix product of `m x k x n`: single-threaded when the caller
/// already runs in parallel, or when the product is too small to pay for the threads.
pub fn parallelism(m: usize, k: usize, n: usize, outer_parallel: bool) -> Parallelism {
    let threads = rayon::current_num_threads();
    if outer_parallel || threads < 2 || m * k * n < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// `c = a b` or `c += a b`; `c` is row-major `a.rows x b.cols`.
pub fn gemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool, par: Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions of a matrix product");
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    let threads = match par {
        Parallelism::Rayon(t) => t.max(1),
        _ => 1,
    };
    // The gemm crate's own threading leaves one core idle on the products of the benchmark
    // models (a batch of 128 rows against a transposed weight runs at one core's speed), so
    // the product is split here into one block of rows or columns per thread, each a
    // single-threaded product. Every element is still one dot product in the crate's fixed
    // order (its k blocking depends on k and the caches only): the split changes no bit.
    let c_ptr = SendPtr(c.as_mut_ptr());
    let one = |i0: usize, i1: usize, j0: usize, j1: usize| {
        let c = c_ptr;
        // SAFETY: the asserts above keep every index inside the slices; `c` does not alias
        // `a` or `b` (it is a unique borrow), and the blocks given to different calls are
        // disjoint.
        unsafe {
            gemm::gemm(
                i1 - i0,
                j1 - j0,
                k,
                c.0.add(i0 * n + j0),
                1,
                n as isize,
                accumulate,
                a.data.as_ptr().offset(i0 as isize * a_rs),
                a_cs,
                a_rs,
                b.data.as_ptr().offset(j0 as isize * b_cs),
                b_cs,
                b_rs,
                1.0, // dst := 1 * dst + ...
                1.0, // ... + 1 * a b
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    };
    if threads < 2 {
        one(0, m, 0, n);
        return;
    }
    // Split the longer side of `c`, in multiples of 16 (a vector register of AVX-512).
    let (len, along_n) = if n >= m { (n, true) } else { (m, false) };
    let chunk = len.div_ceil(threads).div_ceil(16) * 16;
    rayon::scope(|s| {
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            let one = &one;
            s.spawn(move |_| {
                if along_n {
                    one(0, m, start, end)
                } else {
                    one(start, end, 0, n)
                }
            });
            start = end;
        }
    });
}

/// A pointer that may cross to the pool's threads: each thread writes its own block of `c`.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the blocks written through it are disjoint (see `gemm`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ar = if ta {
                MatRef::t(&at, m, k)
            } else {
                MatRef::new(&a, m, k)
            };
            let br = if tb {
                MatRef::t(&bt, k, n)
            } else {
                MatRef::new(&b, k, n)
            };
            let mut c = vec![1.0; m * n];
            gemm(ar, br, &mut c, false, Parallelism::None);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{ta} {tb}: {x} vs {y}");
            }
            gemm(ar, br, &mut c, true, Parallelism::None);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-5, "accumulate {ta} {tb}");
            }
        }
    }

    #[test]
    fn the_split_across_threads_changes_no_bit() {
        // Long and wide shapes, so that both sides of `c` get split, with odd sizes.
        for (m, k, n) in [(37, 300, 203), (203, 77, 37), (128, 784, 100)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
            for tb in [false, true] {
                let ar = MatRef::new(&a, m, k);
                let br = if tb {
                    MatRef::t(&b, k, n)
                } else {
                    MatRef::new(&b, k, n)
                };
                let mut one = vec![0.5; m * n];
                gemm(ar, br, &mut one, true, Parallelism::None);
                for t in [2, 3, 8] {
                    let mut split = vec![0.5; m * n];
                    gemm(ar, br, &mut split, true, Parallelism::Rayon(t));
                    assert!(
                        one.iter()
                            .zip(&split)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{m}x{k}x{n} transposed b {tb}, {t} parts"
                    );
                }
            }
        }
    }
}
