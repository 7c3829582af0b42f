// Implicit-GEMM convolutions (REGIMEN_CONV=implicit): the three products of im2col + GEMM,
//
//   forward       y  [OC, N P]     = W  [OC, K]      col [K, N P]
//   input grad    dx [C, N H W]    = W' [C, OC kh kw] dy-windows [OC kh kw, N H W]
//   weight grad   dW [OC, K]      += dy [OC, N P]    col^T [N P, K]
//
// with every operand read straight from the NCHW tensors: the column matrix (K x N P floats,
// 115 MB for cnn-step's second layer at batch 128) is never written. Each block computes a
// 64 x 128 tile of the product (or 32 x 256) with 256 threads; operands go through shared
// memory BK = 8 or 32 reduction steps at a time (more products between two barriers, more
// registers); a thread decodes its column once, and each reduction index's window comes from
// a table (conv_ig_ktab), so the loops do not divide. The backend runs one tile and BK per
// shape, or times all four on a shape's first use and keeps the fastest (REGIMEN_CONV=auto).
// Two kinds of each kernel:
//
//   - `..._f32`: full f32, each thread keeps 4 x 8 results and multiplies with FMAs;
//   - `..._tf32`: TF32 tensor cores (as PyTorch's convolutions by default): the operands are
//     rounded to TF32 (cvt.rna) as they are staged, and each warp computes a 32 x 32 piece
//     of the tile with 8 mma.sync.m16n8k8 per staged step, accumulating in f32.
//
// The weight gradient reduces over N P (100 352 terms for that layer), so its blocks split the
// reduction into chunks (grid z), each writing its own partial tile; `conv_ig_dw_sum` adds the
// partials in chunk order into dW. No floating-point atomics: results do not depend on timing.
//
// This file is plain C++ on purpose (no intrinsics, no macros of kernels.cu; two PTX
// instructions behind __CUDACC__): `tests/conv_emulated.rs` compiles it on the CPU with a
// small shim that runs each block's threads as host threads and gives those two instructions
// their documented semantics (tests/emulate/shim.h), and holds every kernel to the CPU
// backend. NVRTC compiles it appended to kernels.cu.

// A block's tile is BM x BN = 8192 results: 64 x 128, or 32 x 256 for products of at most 32
// rows (32-channel layers), which a 64-row tile would leave half empty.
#define IG_TILE 8192
#define IG_THREADS 256
// The window tables are padded to a multiple of the largest BK.
#define IG_KPAD 32
// Shared-memory rows are padded by 8 floats: the TF32 fragment reads (lanes 4 apart in k, 1
// apart in m or n) then fall in 32 different banks.
#define IG_PAD 8

// The geometry of one convolution (a `#[repr(C)]` struct on the Rust side: 11 ints).
struct IgShape {
    int nb, c, h, w, oc, kh, kw, stride, pad, oh, ow;
};

#ifdef __CUDACC__
// f32 rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as f32 bits.
__device__ __forceinline__ float ig_tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return __uint_as_float(r);
}
// acc[(mi 4 + ni) 4 + q] += A_mi B_ni for the warp's two 16 x 8 row blocks (mi) and four
// 8 x 8 column blocks (ni): one mma.sync.m16n8k8 each, fragments as the PTX ISA lays them out.
__device__ __forceinline__ void ig_mma_2x4(float acc[32], const float a[2][4], const float b[4][2]) {
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            float* d = acc + (mi * 4 + ni) * 4;
            asm volatile(
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
                "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                : "r"(__float_as_uint(a[mi][0])), "r"(__float_as_uint(a[mi][1])),
                  "r"(__float_as_uint(a[mi][2])), "r"(__float_as_uint(a[mi][3])),
                  "r"(__float_as_uint(b[ni][0])), "r"(__float_as_uint(b[ni][1])));
        }
}
#endif

// acc += the staged step's product for this thread.
//
// f32: acc[i 8 + j] += As[kk][ty 4 + i] Bs[kk][col j] over the 8 staged steps, with
// tx = tid % (BN / 8), ty = tid / (BN / 8); the thread's 8 columns are tx 4 .. tx 4 + 3 and
// BN / 2 + tx 4 .. BN / 2 + tx 4 + 3 (16-byte reads without bank conflicts).
//
// TF32: with WN = BN / 32 warps across, warp w covers rows (w / WN) 32 .. + 31 and columns
// (w % WN) 32 .. + 31 of the tile. For
// lane = 4 g + t, the A fragment of row block mi is (m, k) = (r, t), (r + 8, t), (r, t + 4),
// (r + 8, t + 4) with r = mi 16 + g, and the B fragment of column block ni is (k, n) = (t, c),
// (t + 4, c) with c = ni 8 + g.
template <bool TF32, int BM, int BK>
__device__ __forceinline__ void ig_mac(const float (*As)[BM + IG_PAD],
                                       const float (*Bs)[IG_TILE / BM + IG_PAD], float acc[32],
                                       int tid) {
    constexpr int BN = IG_TILE / BM, WN = BN / 32;
    if (TF32) {
        const int lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
        const int mb = (warp / WN) * 32, nb = (warp % WN) * 32;
        // One group of eight mma.sync per 8 staged reduction steps (rows k8 .. k8 + 7).
#pragma unroll
        for (int k8 = 0; k8 < BK; k8 += 8) {
            float a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                int r = mb + mi * 16 + g;
                a[mi][0] = As[k8 + t][r];
                a[mi][1] = As[k8 + t][r + 8];
                a[mi][2] = As[k8 + t + 4][r];
                a[mi][3] = As[k8 + t + 4][r + 8];
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int c = nb + ni * 8 + g;
                b[ni][0] = Bs[k8 + t][c];
                b[ni][1] = Bs[k8 + t + 4][c];
            }
            ig_mma_2x4(acc, a, b);
        }
    } else {
        const int tx = tid % (BN / 8), ty = tid / (BN / 8);
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float4 a = *(const float4*)&As[kk][ty * 4];
            float4 b0 = *(const float4*)&Bs[kk][tx * 4];
            float4 b1 = *(const float4*)&Bs[kk][BN / 2 + tx * 4];
            float av[4] = {a.x, a.y, a.z, a.w};
            float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 8; j++) acc[i * 8 + j] += av[i] * bv[j];
        }
    }
}

// A thread's 32 results cover 8 tile columns and 4 tile rows: result e = ig_e(c, r) is at
// column ig_colof(c) and row ig_rowof(r) (c < 8, r < 4), as ig_mac lays them out.
template <bool TF32>
__device__ __forceinline__ int ig_e(int c, int r) {
    // TF32: c = 2 ni + (q % 2), r = 2 mi + q / 2, e = (4 mi + ni) 4 + q. f32: e = 8 r + c.
    return TF32 ? ((r / 2) * 4 + c / 2) * 4 + (r % 2) * 2 + c % 2 : r * 8 + c;
}
template <bool TF32, int BM>
__device__ __forceinline__ int ig_colof(int tid, int c) {
    constexpr int BN = IG_TILE / BM;
    if (TF32) {
        const int lane = tid % 32, warp = tid / 32;
        return (warp % (BN / 32)) * 32 + (c / 2) * 8 + (lane % 4) * 2 + c % 2;
    }
    const int tx = tid % (BN / 8);
    return c < 4 ? tx * 4 + c : BN / 2 - 4 + tx * 4 + c;
}
template <bool TF32, int BM>
__device__ __forceinline__ int ig_rowof(int tid, int r) {
    constexpr int BN = IG_TILE / BM;
    if (TF32) {
        const int lane = tid % 32, warp = tid / 32;
        return (warp / (BN / 32)) * 32 + (r / 2) * 16 + lane / 4 + (r % 2) * 8;
    }
    return (tid / (BN / 8)) * 4 + r;
}

// A staged operand value: rounded to TF32 for the tensor cores.
template <bool TF32>
__device__ __forceinline__ float ig_stage(float v) {
    return TF32 ? ig_tf32(v) : v;
}

// One staged step of the forward and input-gradient loops: this thread's BM BK / 256 values
// of A (row e / BK, k e % BK for e = tid + 256 i) and BN BK / 256 of B (column tid % BN, rows
// tid / BN + (256 / BN) i) into shared memory once every warp is done with the previous step;
// then `next()` loads the next step's values into ra and rb (their global loads in flight
// while the products of this step run), then the products.
template <bool TF32, int BM, int BK, class Next>
__device__ __forceinline__ void ig_step(float (*As)[BM + IG_PAD],
                                        float (*Bs)[IG_TILE / BM + IG_PAD], const float* ra,
                                        const float* rb, float acc[32], int tid, Next next) {
    constexpr int BN = IG_TILE / BM;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < BM * BK / IG_THREADS; i++) {
        int e = tid + IG_THREADS * i;
        As[e % BK][e / BK] = ig_stage<TF32>(ra[i]);
    }
#pragma unroll
    for (int i = 0; i < BN * BK / IG_THREADS; i++)
        Bs[tid / BN + (IG_THREADS / BN) * i][tid % BN] = ig_stage<TF32>(rb[i]);
    __syncthreads();
    next();
    ig_mac<TF32, BM, BK>(As, Bs, acc, tid);
}

// An index that fails every bounds check of the gathers (padding rows of the tables).
#define IG_FAIL (1 << 29)

// The window table of a reduction index k, so that the main loops gather without dividing:
//   forward (dx = 0), k = (ci, ki, kj) over C kh kw: {ci H W + ki W + kj, ki, kj, 0};
//   input grad (dx = 1), k = (o, ki, kj) over OC kh kw: {o P - ki OW - kj, ki, kj,
//   o C kh kw + ki kw + kj};
// padded to `n` entries (a multiple of IG_KPAD) with {0, IG_FAIL, IG_FAIL, 0}.
extern "C" __global__ void conv_ig_ktab(IgShape s, int4* tab, int dx, int n) {
    const int khw = s.kh * s.kw, K = (dx ? s.oc : s.c) * khw;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += blockDim.x * gridDim.x) {
        int4 t = {0, IG_FAIL, IG_FAIL, 0};
        if (k < K) {
            int a = k / khw, r = k - a * khw, ki = r / s.kw, kj = r - ki * s.kw;
            if (dx)
                t = {a * s.oh * s.ow - ki * s.ow - kj, ki, kj, a * s.c * khw + r};
            else
                t = {a * s.h * s.w + ki * s.w + kj, ki, kj, 0};
        }
        tab[k] = t;
    }
}

// y [N, OC, OH, OW] (+ bias) = conv(x [N, C, H, W], W [OC, C, kh, kw]); `tab` is the forward
// window table (conv_ig_ktab, dx = 0). Grid: (ceil(N P / BN), ceil(OC / BM)).
template <bool TF32, int BM, int BK>
__device__ void ig_fwd(const float* __restrict__ x, const float* __restrict__ wt,
                       const float* __restrict__ bias, float* __restrict__ y,
                       const int4* __restrict__ tab, IgShape s) {
    constexpr int BN = IG_TILE / BM;
    __shared__ __align__(16) float As[BK][BM + IG_PAD];
    __shared__ __align__(16) float Bs[BK][BN + IG_PAD];
    const int tid = threadIdx.x;
    const int khw = s.kh * s.kw, K = s.c * khw, P = s.oh * s.ow;
    const long long N = (long long)s.nb * P;
    const int m0 = blockIdx.y * BM;
    const long long n0 = (long long)blockIdx.x * BN;
    // This thread stages column nn of B (fixed for the whole reduction), rows
    // kb + (256 / BN) i.
    const int nn = tid % BN, kb = tid / BN;
    const long long j = n0 + nn;
    // Out of range, the column gathers nothing: its window starts where every check fails.
    int iy0 = IG_FAIL, ix0 = IG_FAIL;
    const float* xs = x;
    if (j < N) {
        int smp = (int)(j / P), pos = (int)(j - (long long)smp * P);
        int oy = pos / s.ow, ox = pos - oy * s.ow;
        iy0 = oy * s.stride - s.pad;
        ix0 = ox * s.stride - s.pad;
        // x at the window's corner (may lie outside the image; read only inside it).
        xs = x + (long long)smp * s.c * s.h * s.w + (long long)iy0 * s.w + ix0;
    }
    float acc[32];
#pragma unroll
    for (int e = 0; e < 32; e++) acc[e] = 0.0f;
    float ra[BM * BK / IG_THREADS], rb[BN * BK / IG_THREADS];
    // This thread's values of the step at k0.
    auto load = [&](int k0) {
        // A: BK consecutive threads read BK consecutive k of one row of W.
#pragma unroll
        for (int i = 0; i < BM * BK / IG_THREADS; i++) {
            int e = tid + IG_THREADS * i, k = k0 + e % BK, m = m0 + e / BK;
            ra[i] = (m < s.oc && k < K) ? wt[(long long)m * K + k] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < BN * BK / IG_THREADS; i++) {
            int4 t = tab[k0 + kb + (IG_THREADS / BN) * i];
            bool in = (unsigned)(iy0 + t.y) < (unsigned)s.h && (unsigned)(ix0 + t.z) < (unsigned)s.w;
            rb[i] = in ? xs[t.x] : 0.0f;
        }
    };
    load(0);
    for (int k0 = 0; k0 < K; k0 += BK)
        ig_step<TF32, BM, BK>(As, Bs, ra, rb, acc, tid, [&] {
            if (k0 + BK < K) load(k0 + BK);
        });
    float b[4];
    int rows[4];
#pragma unroll
    for (int r = 0; r < 4; r++) {
        rows[r] = m0 + ig_rowof<TF32, BM>(tid, r);
        b[r] = (bias && rows[r] < s.oc) ? bias[rows[r]] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < 8; c++) {
        long long jj = n0 + ig_colof<TF32, BM>(tid, c);
        if (jj >= N) continue;
        int smp = (int)(jj / P), pos = (int)(jj - (long long)smp * P);
        float* out = y + (long long)smp * s.oc * P + pos;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            if (rows[r] >= s.oc) continue;
            float v = acc[ig_e<TF32>(c, r)];
            out[(long long)rows[r] * P] = bias ? v + b[r] : v;
        }
    }
}

// dx [N, C, H, W] = the input gradient of the convolution for dy [N, OC, OH, OW]: input pixel
// (iy, ix) gathers dy at (oy, ox) for every window entry (ki, kj) with oy stride + ki - pad = iy
// (the same sums as col2im of W^T dy, without the column matrix). `tab` is the input-gradient
// window table (conv_ig_ktab, dx = 1); strides above 1 decode k themselves. The kernel owns
// the shared tiles As, Bs (both instantiations use the same ones: each declaring its own would
// double the block's shared memory past the 48 KiB a kernel may declare).
// Grid: (ceil(N H W / BN), ceil(C / BM)).
template <bool TF32, int BM, int BK, bool UNIT_STRIDE>
__device__ void ig_dx(const float* __restrict__ dy, const float* __restrict__ wt,
                      float* __restrict__ dx, const int4* __restrict__ tab, IgShape s,
                      float (*As)[BM + IG_PAD], float (*Bs)[IG_TILE / BM + IG_PAD]) {
    constexpr int BN = IG_TILE / BM;
    const int tid = threadIdx.x;
    const int khw = s.kh * s.kw, K = s.oc * khw, P = s.oh * s.ow, hw = s.h * s.w;
    const long long N = (long long)s.nb * hw;
    const int m0 = blockIdx.y * BM;
    const long long n0 = (long long)blockIdx.x * BN;
    const int nn = tid % BN, kb = tid / BN;
    const long long j = n0 + nn;
    const bool jok = j < N;
    const float* ys = dy;
    int ty0 = -IG_FAIL, tx0 = -IG_FAIL;
    if (jok) {
        int smp = (int)(j / hw), pos = (int)(j - (long long)smp * hw);
        int iy = pos / s.w, ix = pos - iy * s.w;
        ty0 = iy + s.pad;
        tx0 = ix + s.pad;
        ys = dy + (long long)smp * s.oc * P;
    }
    // Stride 1: dy at (ty0 - ki, tx0 - kj) of plane o is ys1[o P - ki OW - kj].
    const float* ys1 = jok ? ys + (long long)ty0 * s.ow + tx0 : dy;
    float acc[32];
#pragma unroll
    for (int e = 0; e < 32; e++) acc[e] = 0.0f;
    float ra[BM * BK / IG_THREADS], rb[BN * BK / IG_THREADS];
    // This thread's values of the step at k0.
    auto load = [&](int k0) {
        // A [C, OC kh kw]: A[c][(o, r)] = W[o][c][r], at tab[k].w + c kh kw.
#pragma unroll
        for (int i = 0; i < BM * BK / IG_THREADS; i++) {
            int e = tid + IG_THREADS * i, k = k0 + e % BK, m = m0 + e / BK;
            ra[i] = (m < s.c && k < K) ? wt[tab[k].w + (long long)m * khw] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < BN * BK / IG_THREADS; i++) {
            int k = k0 + kb + (IG_THREADS / BN) * i;
            float v = 0.0f;
            if (UNIT_STRIDE) {
                int4 t = tab[k];
                bool in = (unsigned)(ty0 - t.y) < (unsigned)s.oh &&
                          (unsigned)(tx0 - t.z) < (unsigned)s.ow;
                if (in) v = ys1[t.x];
            } else if (jok && k < K) {
                int o = k / khw, r = k - o * khw, ki = r / s.kw, kj = r - ki * s.kw;
                int oy = ty0 - ki, ox = tx0 - kj;
                bool ok = oy >= 0 && ox >= 0 && oy % s.stride == 0 && ox % s.stride == 0;
                oy /= s.stride;
                ox /= s.stride;
                if (ok && oy < s.oh && ox < s.ow) v = ys[o * P + oy * s.ow + ox];
            }
            rb[i] = v;
        }
    };
    load(0);
    for (int k0 = 0; k0 < K; k0 += BK)
        ig_step<TF32, BM, BK>(As, Bs, ra, rb, acc, tid, [&] {
            if (k0 + BK < K) load(k0 + BK);
        });
#pragma unroll
    for (int c = 0; c < 8; c++) {
        long long jj = n0 + ig_colof<TF32, BM>(tid, c);
        if (jj >= N) continue;
        int smp = (int)(jj / hw), pos = (int)(jj - (long long)smp * hw);
        float* out = dx + (long long)smp * s.c * hw + pos;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int m = m0 + ig_rowof<TF32, BM>(tid, r);
            if (m < s.c) out[(long long)m * hw] = acc[ig_e<TF32>(c, r)];
        }
    }
}

// The partial weight gradients of chunk z (grid z) of the reduction over N P:
// part[z][o][k] = sum over j in [z chunk, (z + 1) chunk) of dy[o, j] col[k, j].
// Grid: (ceil(K / BN), ceil(OC / BM), chunks).
template <bool TF32, int BM, int BK>
__device__ void ig_dw(const float* __restrict__ x, const float* __restrict__ dy,
                      float* __restrict__ part, IgShape s, int chunk) {
    constexpr int BN = IG_TILE / BM;
    __shared__ __align__(16) float As[BK][BM + IG_PAD];
    __shared__ __align__(16) float Bs[BK][BN + IG_PAD];
    const int tid = threadIdx.x;
    const int khw = s.kh * s.kw, K = s.c * khw, P = s.oh * s.ow, hw = s.h * s.w;
    const long long N = (long long)s.nb * P;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const long long r0 = (long long)blockIdx.z * chunk;
    const long long r1 = r0 + chunk < N ? r0 + chunk : N;
    // This thread stages reduction row jj of both tiles: A rows lane + L i (i < BM / L),
    // B columns lane + L i (i < BN / L) with L = 256 / BK lanes, whose window offsets are
    // fixed for the block.
    constexpr int L = IG_THREADS / BK;
    const int jj = tid % BK, lane = tid / BK;
    int coff[BN / L], kio[BN / L], kjo[BN / L];
    bool kok[BN / L];
#pragma unroll
    for (int i = 0; i < BN / L; i++) {
        int k = n0 + lane + L * i;
        kok[i] = k < K;
        int ci = kok[i] ? k / khw : 0, r = kok[i] ? k - ci * khw : 0;
        kio[i] = r / s.kw;
        kjo[i] = r - kio[i] * s.kw;
        coff[i] = ci * hw;
    }
    float acc[32];
#pragma unroll
    for (int e = 0; e < 32; e++) acc[e] = 0.0f;
    // The position (sample, oy, ox) of reduction row j = t0 + jj, decoded once and then
    // advanced by BK per step without dividing.
    int smp, oy, ox;
    {
        long long j = r0 + jj;
        smp = (int)(j / P);
        int pos = (int)(j - (long long)smp * P);
        oy = pos / s.ow;
        ox = pos - oy * s.ow;
    }
    float ra[BM / L], rb[BN / L];
    // This thread's values of the step at t0 (reduction row t0 + jj), then the position of
    // the next step's row.
    auto load = [&](long long t0) {
#pragma unroll
        for (int i = 0; i < BM / L; i++) ra[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < BN / L; i++) rb[i] = 0.0f;
        long long j = t0 + jj;
        if (j < r1) {
            int iy0 = oy * s.stride - s.pad, ix0 = ox * s.stride - s.pad;
            const float* xs = x + (long long)smp * s.c * hw;
            const float* ys = dy + (long long)smp * s.oc * P + oy * s.ow + ox;
#pragma unroll
            for (int i = 0; i < BM / L; i++) {
                int m = m0 + lane + L * i;
                if (m < s.oc) ra[i] = ys[(long long)m * P];
            }
#pragma unroll
            for (int i = 0; i < BN / L; i++) {
                int iy = iy0 + kio[i], ix = ix0 + kjo[i];
                if (kok[i] && iy >= 0 && iy < s.h && ix >= 0 && ix < s.w)
                    rb[i] = xs[coff[i] + iy * s.w + ix];
            }
        }
        for (ox += BK; ox >= s.ow; ox -= s.ow)
            if (++oy == s.oh) {
                oy = 0;
                smp++;
            }
    };
    load(r0);
    for (long long t0 = r0; t0 < r1; t0 += BK) {
        __syncthreads();
#pragma unroll
        for (int i = 0; i < BM / L; i++) As[jj][lane + L * i] = ig_stage<TF32>(ra[i]);
#pragma unroll
        for (int i = 0; i < BN / L; i++) Bs[jj][lane + L * i] = ig_stage<TF32>(rb[i]);
        __syncthreads();
        // The next step's loads in flight while this step's products run.
        if (t0 + BK < r1) load(t0 + BK);
        ig_mac<TF32, BM, BK>(As, Bs, acc, tid);
    }
    float* out = part + (long long)blockIdx.z * s.oc * K;
#pragma unroll
    for (int c = 0; c < 8; c++) {
        int k = n0 + ig_colof<TF32, BM>(tid, c);
        if (k >= K) continue;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int m = m0 + ig_rowof<TF32, BM>(tid, r);
            if (m < s.oc) out[(long long)m * K + k] = acc[ig_e<TF32>(c, r)];
        }
    }
}

// The kernels: kind (fwd, dx, dw) x arithmetic (f32, tf32) x tile (64 x 128, or 32 x 256 with
// the suffix _m32) x staged steps (BK 8, or 32 with the suffix _k32).
#define IG_KERNELS(SUFFIX, TF32, BM, BK)                                                        \
    extern "C" __global__ void __launch_bounds__(IG_THREADS) conv_ig_fwd_##SUFFIX(              \
        const float* x, const float* wt, const float* bias, float* y, const int4* tab,         \
        IgShape s) {                                                                           \
        ig_fwd<TF32, BM, BK>(x, wt, bias, y, tab, s);                                          \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(IG_THREADS) conv_ig_dx_##SUFFIX(               \
        const float* dy, const float* wt, float* dx, const int4* tab, IgShape s) {             \
        __shared__ __align__(16) float As[BK][BM + IG_PAD];                                    \
        __shared__ __align__(16) float Bs[BK][IG_TILE / BM + IG_PAD];                          \
        if (s.stride == 1)                                                                     \
            ig_dx<TF32, BM, BK, true>(dy, wt, dx, tab, s, As, Bs);                             \
        else                                                                                   \
            ig_dx<TF32, BM, BK, false>(dy, wt, dx, tab, s, As, Bs);                            \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(IG_THREADS) conv_ig_dw_##SUFFIX(               \
        const float* x, const float* dy, float* part, IgShape s, int chunk) {                  \
        ig_dw<TF32, BM, BK>(x, dy, part, s, chunk);                                            \
    }
IG_KERNELS(f32, false, 64, 8)
IG_KERNELS(tf32, true, 64, 8)
IG_KERNELS(f32_m32, false, 32, 8)
IG_KERNELS(tf32_m32, true, 32, 8)
IG_KERNELS(f32_k32, false, 64, 32)
IG_KERNELS(tf32_k32, true, 64, 32)
IG_KERNELS(f32_m32_k32, false, 32, 32)
IG_KERNELS(tf32_m32_k32, true, 32, 32)

// dW [n] += the sum of the chunks' partials part[z][n]: a block per 32 columns, its eight
// warps over the chunks (warp l sums chunks l, l + 8, ... in order, a warp's lanes reading 32
// neighbouring columns), the eight sums then added in order (one thread per column summing
// every chunk waited on hundreds of loads one after another). Grid: ceil(n / 32) blocks of
// 256 threads.
extern "C" __global__ void conv_ig_dw_sum(const float* part, float* dw, int chunks, long long n) {
    __shared__ float sums[8][32];
    const int lc = threadIdx.x % 32, lane = threadIdx.x / 32;
    const long long col = (long long)blockIdx.x * 32 + lc;
    float acc = 0.0f;
    if (col < n)
        for (int z = lane; z < chunks; z += 8) acc += part[(long long)z * n + col];
    sums[lane][lc] = acc;
    __syncthreads();
    if (lane == 0 && col < n) {
        float t = 0.0f;
        for (int l = 0; l < 8; l++) t += sums[l][lc];
        dw[col] += t;
    }
}
