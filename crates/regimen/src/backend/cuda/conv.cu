// Implicit-GEMM convolutions (REGIMEN_CONV=implicit): the three products of im2col + GEMM,
//
//   forward       y  [OC, N P]     = W  [OC, K]      col [K, N P]
//   input grad    dx [C, N H W]    = W' [C, OC kh kw] dy-windows [OC kh kw, N H W]
//   weight grad   dW [OC, K]      += dy [OC, N P]    col^T [N P, K]
//
// with every operand read straight from the NCHW tensors: the column matrix (K x N P floats,
// 115 MB for cnn-step's second layer at batch 128) is never written. Each block computes a
// 64 x 128 tile of the product with 256 threads, 4 x 8 results per thread, in full f32 (FMA;
// no TF32). Operands go through shared memory 8 reduction steps at a time; the gather of a
// thread's column is decoded once per tile, not once per element.
//
// The weight gradient reduces over N P (100 352 terms for that layer), so its blocks split the
// reduction into chunks (grid z), each writing its own partial tile; `conv_ig_dw_sum` adds the
// partials in chunk order into dW. No floating-point atomics: results do not depend on timing.
//
// This file is plain C++ on purpose (no PTX, no intrinsics, no macros of kernels.cu):
// `tests/conv_emulated.rs` compiles it on the CPU with a small shim that runs each block's
// threads as host threads, and holds every kernel to the CPU backend. NVRTC compiles it
// appended to kernels.cu.

#define IG_BM 64
#define IG_BN 128
#define IG_BK 8
#define IG_THREADS 256

// The geometry of one convolution (a `#[repr(C)]` struct on the Rust side: 11 ints).
struct IgShape {
    int nb, c, h, w, oc, kh, kw, stride, pad, oh, ow;
};

// acc[i][j] += As[kk][ty 4 + i] Bs[kk][col j] over the 8 steps of a staged tile; a thread's
// 8 columns are tx 4 .. tx 4 + 3 and 64 + tx 4 .. 64 + tx 4 + 3 (16-byte reads without bank
// conflicts).
__device__ __forceinline__ void ig_mac(const float (*As)[IG_BM], const float (*Bs)[IG_BN],
                                       float acc[4][8], int ty, int tx) {
#pragma unroll
    for (int kk = 0; kk < IG_BK; kk++) {
        float4 a = *(const float4*)&As[kk][ty * 4];
        float4 b0 = *(const float4*)&Bs[kk][tx * 4];
        float4 b1 = *(const float4*)&Bs[kk][64 + tx * 4];
        float av[4] = {a.x, a.y, a.z, a.w};
        float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 8; j++) acc[i][j] += av[i] * bv[j];
    }
}

// The tile column `c` (0..7) of thread `tx`.
__device__ __forceinline__ int ig_col(int tx, int c) { return c < 4 ? tx * 4 + c : 60 + tx * 4 + c; }

// y [N, OC, OH, OW] (+ bias) = conv(x [N, C, H, W], W [OC, C, kh, kw]).
// Grid: (ceil(N P / 128), ceil(OC / 64)).
extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv_ig_fwd(const float* x, const float* wt, const float* bias, float* y, IgShape s) {
    __shared__ __align__(16) float As[IG_BK][IG_BM];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int khw = s.kh * s.kw, K = s.c * khw, P = s.oh * s.ow, hw = s.h * s.w;
    const long long N = (long long)s.nb * P;
    const int m0 = blockIdx.y * IG_BM;
    const long long n0 = (long long)blockIdx.x * IG_BN;
    // This thread stages column nn of B (fixed for the whole reduction), rows kb + 2 i.
    const int nn = tid % IG_BN, kb = tid / IG_BN;
    const long long j = n0 + nn;
    const bool jok = j < N;
    const float* xs = x;
    int iy0 = 0, ix0 = 0;
    if (jok) {
        int smp = (int)(j / P), pos = (int)(j - (long long)smp * P);
        int oy = pos / s.ow, ox = pos - oy * s.ow;
        iy0 = oy * s.stride - s.pad;
        ix0 = ox * s.stride - s.pad;
        xs = x + (long long)smp * s.c * hw;
    }
    float acc[4][8];
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += IG_BK) {
        float ra[2], rb[4];
        for (int i = 0; i < 2; i++) {
            int e = tid + IG_THREADS * i, mm = e % IG_BM, k = k0 + e / IG_BM, m = m0 + mm;
            ra[i] = (m < s.oc && k < K) ? wt[(long long)m * K + k] : 0.0f;
        }
        for (int i = 0; i < 4; i++) {
            int k = k0 + kb + 2 * i;
            float v = 0.0f;
            if (jok && k < K) {
                int ci = k / khw, r = k - ci * khw, ki = r / s.kw, kj = r - ki * s.kw;
                int iy = iy0 + ki, ix = ix0 + kj;
                if (iy >= 0 && iy < s.h && ix >= 0 && ix < s.w) v = xs[ci * hw + iy * s.w + ix];
            }
            rb[i] = v;
        }
        __syncthreads();
        for (int i = 0; i < 2; i++) {
            int e = tid + IG_THREADS * i;
            As[e / IG_BM][e % IG_BM] = ra[i];
        }
        for (int i = 0; i < 4; i++) Bs[kb + 2 * i][nn] = rb[i];
        __syncthreads();
        ig_mac(As, Bs, acc, ty, tx);
    }
    for (int c = 0; c < 8; c++) {
        long long jj = n0 + ig_col(tx, c);
        if (jj >= N) continue;
        int smp = (int)(jj / P), pos = (int)(jj - (long long)smp * P);
        for (int i = 0; i < 4; i++) {
            int m = m0 + ty * 4 + i;
            if (m < s.oc) {
                float v = acc[i][c];
                y[((long long)smp * s.oc + m) * P + pos] = bias ? v + bias[m] : v;
            }
        }
    }
}

// dx [N, C, H, W] = the input gradient of the convolution for dy [N, OC, OH, OW]: input pixel
// (iy, ix) gathers dy at (oy, ox) for every window entry (ki, kj) with oy stride + ki - pad = iy
// (the same sums as col2im of W^T dy, without the column matrix).
// Grid: (ceil(N H W / 128), ceil(C / 64)).
extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv_ig_dx(const float* dy, const float* wt, float* dx, IgShape s) {
    __shared__ __align__(16) float As[IG_BK][IG_BM];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int khw = s.kh * s.kw, K = s.oc * khw, P = s.oh * s.ow, hw = s.h * s.w;
    const long long N = (long long)s.nb * hw;
    const int m0 = blockIdx.y * IG_BM;
    const long long n0 = (long long)blockIdx.x * IG_BN;
    const int nn = tid % IG_BN, kb = tid / IG_BN;
    const long long j = n0 + nn;
    const bool jok = j < N;
    const float* ys = dy;
    int ty0 = 0, tx0 = 0;
    if (jok) {
        int smp = (int)(j / hw), pos = (int)(j - (long long)smp * hw);
        int iy = pos / s.w, ix = pos - iy * s.w;
        ty0 = iy + s.pad;
        tx0 = ix + s.pad;
        ys = dy + (long long)smp * s.oc * P;
    }
    float acc[4][8];
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += IG_BK) {
        float ra[2], rb[4];
        // A [C, OC kh kw]: A[c][(o, r)] = W[o][c][r].
        for (int i = 0; i < 2; i++) {
            int e = tid + IG_THREADS * i, mm = e % IG_BM, k = k0 + e / IG_BM, m = m0 + mm;
            float v = 0.0f;
            if (m < s.c && k < K) {
                int o = k / khw, r = k - o * khw;
                v = wt[((long long)o * s.c + m) * khw + r];
            }
            ra[i] = v;
        }
        for (int i = 0; i < 4; i++) {
            int k = k0 + kb + 2 * i;
            float v = 0.0f;
            if (jok && k < K) {
                int o = k / khw, r = k - o * khw, ki = r / s.kw, kj = r - ki * s.kw;
                int oy = ty0 - ki, ox = tx0 - kj;
                bool ok = oy >= 0 && ox >= 0;
                if (ok && s.stride != 1) {
                    ok = oy % s.stride == 0 && ox % s.stride == 0;
                    oy /= s.stride;
                    ox /= s.stride;
                }
                if (ok && oy < s.oh && ox < s.ow) v = ys[o * P + oy * s.ow + ox];
            }
            rb[i] = v;
        }
        __syncthreads();
        for (int i = 0; i < 2; i++) {
            int e = tid + IG_THREADS * i;
            As[e / IG_BM][e % IG_BM] = ra[i];
        }
        for (int i = 0; i < 4; i++) Bs[kb + 2 * i][nn] = rb[i];
        __syncthreads();
        ig_mac(As, Bs, acc, ty, tx);
    }
    for (int c = 0; c < 8; c++) {
        long long jj = n0 + ig_col(tx, c);
        if (jj >= N) continue;
        int smp = (int)(jj / hw), pos = (int)(jj - (long long)smp * hw);
        for (int i = 0; i < 4; i++) {
            int m = m0 + ty * 4 + i;
            if (m < s.c) dx[((long long)smp * s.c + m) * hw + pos] = acc[i][c];
        }
    }
}

// The partial weight gradients of chunk z (grid z) of the reduction over N P:
// part[z][o][k] = sum over j in [z chunk, (z + 1) chunk) of dy[o, j] col[k, j].
// Grid: (ceil(K / 128), ceil(OC / 64), chunks); `chunk` is a multiple of 8.
extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv_ig_dw(const float* x, const float* dy, float* part, IgShape s, int chunk) {
    __shared__ __align__(16) float As[IG_BK][IG_BM];
    __shared__ __align__(16) float Bs[IG_BK][IG_BN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int khw = s.kh * s.kw, K = s.c * khw, P = s.oh * s.ow, hw = s.h * s.w;
    const long long N = (long long)s.nb * P;
    const int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * IG_BN;
    const long long r0 = (long long)blockIdx.z * chunk;
    const long long r1 = r0 + chunk < N ? r0 + chunk : N;
    // This thread stages reduction row jj of both tiles: A rows mm = tid / 8 + 32 i (i < 2),
    // B columns nn = tid / 8 + 32 i (i < 4), whose window offsets are fixed for the block.
    const int jj = tid % IG_BK, lane = tid / IG_BK;
    int coff[4], kio[4], kjo[4];
    bool kok[4];
    for (int i = 0; i < 4; i++) {
        int k = n0 + lane + 32 * i;
        kok[i] = k < K;
        int ci = kok[i] ? k / khw : 0, r = kok[i] ? k - ci * khw : 0;
        kio[i] = r / s.kw;
        kjo[i] = r - kio[i] * s.kw;
        coff[i] = ci * hw;
    }
    float acc[4][8];
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
    for (long long t0 = r0; t0 < r1; t0 += IG_BK) {
        float ra[2] = {0.0f, 0.0f}, rb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        long long j = t0 + jj;
        if (j < r1) {
            int smp = (int)(j / P), pos = (int)(j - (long long)smp * P);
            int oy = pos / s.ow, ox = pos - oy * s.ow;
            int iy0 = oy * s.stride - s.pad, ix0 = ox * s.stride - s.pad;
            const float* xs = x + (long long)smp * s.c * hw;
            const float* ys = dy + (long long)smp * s.oc * P + pos;
            for (int i = 0; i < 2; i++) {
                int m = m0 + lane + 32 * i;
                if (m < s.oc) ra[i] = ys[(long long)m * P];
            }
            for (int i = 0; i < 4; i++) {
                int iy = iy0 + kio[i], ix = ix0 + kjo[i];
                if (kok[i] && iy >= 0 && iy < s.h && ix >= 0 && ix < s.w)
                    rb[i] = xs[coff[i] + iy * s.w + ix];
            }
        }
        __syncthreads();
        for (int i = 0; i < 2; i++) As[jj][lane + 32 * i] = ra[i];
        for (int i = 0; i < 4; i++) Bs[jj][lane + 32 * i] = rb[i];
        __syncthreads();
        ig_mac(As, Bs, acc, ty, tx);
    }
    float* out = part + (long long)blockIdx.z * s.oc * K;
    for (int c = 0; c < 8; c++) {
        int k = n0 + ig_col(tx, c);
        if (k >= K) continue;
        for (int i = 0; i < 4; i++) {
            int m = m0 + ty * 4 + i;
            if (m < s.oc) out[(long long)m * K + k] = acc[i][c];
        }
    }
}

// dW [n] += the sum of the chunks' partials part[z][n], in chunk order.
extern "C" __global__ void conv_ig_dw_sum(const float* part, float* dw, int chunks, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < chunks; z++) acc += part[(long long)z * n + i];
        dw[i] += acc;
    }
}
