// regimen's CUDA kernels, compiled at run time by NVRTC (once per process) and loaded as one
// module. Each kernel mirrors one operation of the CPU backend (`backend/cpu/`), with the
// same formulas and the same rules for ties and NaN; the conformance tests compare the two.
//
// Conventions: `n` counts elements; indices are 64-bit where a tensor may exceed 2^31
// elements. Grid-stride loops make every kernel correct for any grid size. Reductions are
// deterministic: each block reduces a fixed range in a fixed order, partial results are
// combined in a fixed order by a second kernel (no floating-point atomics), so a result does
// not depend on timing.
//
// 16-bit types are stored as raw `unsigned short` bits and converted with PTX `cvt`
// (round to nearest even), so no header is needed.
//
// The file is also plain C++: `tests/kernels_emulated.rs` compiles it on the CPU with
// `tests/emulate/shim.h` (the PTX conversions and CUDA's intrinsics behind `__CUDACC__`
// there) and runs the batch-building kernels against the CPU backend.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#ifdef __CUDACC__
#define INFINITY __int_as_float(0x7f800000)
#endif

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

// Planes on the y axis of the grid (strided), the positions of a plane on the x axis
// (strided), with 32-bit arithmetic inside a plane: per-element 64-bit divisions cost tens of
// instructions each, which made the channel kernels compute-bound.
#define PLANE_LOOP(plane, i, planes, inner)                                                 \
    for (long long plane = blockIdx.y; plane < (long long)(planes); plane += gridDim.y)     \
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(inner);    \
             i += blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------
// 16-bit conversions

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }
#ifdef __CUDACC__  // (the CPU emulator of the tests, tests/emulate/shim.h, gives their semantics)
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#endif

extern "C" __global__ void cast_f32_bf16(const float* x, u16* y, long long n) {
    GRID_STRIDE(i, n) y[i] = f32_to_bf16(x[i]);
}
extern "C" __global__ void cast_f32_f16(const float* x, u16* y, long long n) {
    GRID_STRIDE(i, n) y[i] = f32_to_f16(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const u16* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = bf16_to_f32(x[i]);
}

// Activations in f32 or bf16 (bf16 activations): a kernel that reads them comes twice, for x
// (and y) in f32 and, with the suffix _h, in bf16, from one template whose loads (ld_act) and
// stores (st_act) convert; the arithmetic is f32 in both, and input gradients are f32 in both.
__device__ __forceinline__ float ld_act(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld_act(const u16* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st_act(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st_act(u16* p, long long i, float v) { p[i] = f32_to_bf16(v); }

// The f32 kernel `name` and its bf16 twin `name_h`, both the template `name_t` with the
// given parameters (X: the activations' element type) and arguments.
#define ACT_TWINS(name, params_f, params_h, args)                \
    extern "C" __global__ void name params_f { name##_t args; } \
    extern "C" __global__ void name##_h params_h { name##_t args; }
extern "C" __global__ void cast_f16_f32(const u16* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = f16_to_f32(x[i]);
}

// ---------------------------------------------------------------------------------------
// Philox4x32-10 (rng.rs documents the key and counter layout; the CPU implements the same).

__device__ __forceinline__ void philox(u32 c[4], u32 k0, u32 k1) {
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

// The uniform in [0, 1) of draw (stream, step, purpose, index).
__device__ __forceinline__ float philox_uniform(u64 stream, u32 step, u32 purpose, u64 index) {
    u64 block = index >> 2;
    u32 c[4] = {(u32)block, (u32)(block >> 32), step, purpose};
    philox(c, (u32)stream, (u32)(stream >> 32));
    return (float)(c[index & 3] >> 8) * (1.0f / 16777216.0f);
}

// The four uniforms of Philox block q (draws 4 q .. 4 q + 3 of (stream, step, purpose)), as
// philox_uniform gives them one by one: the kernels below take a block per thread, each
// element's draw computed once (a thread per element computed its whole block and kept a
// quarter of it).
__device__ __forceinline__ void philox_block(u64 stream, u32 step, u32 purpose, u64 q,
                                             float u[4]) {
    u32 c[4] = {(u32)q, (u32)(q >> 32), step, purpose};
    philox(c, (u32)stream, (u32)(stream >> 32));
    for (int k = 0; k < 4; k++) u[k] = (float)(c[k] >> 8) * (1.0f / 16777216.0f);
}

extern "C" __global__ void uniform_fill(float* out, long long n, u64 stream, const u32* step,
                                        u32 purpose) {
    u32 s = *step;
    GRID_STRIDE(q, (n + 3) / 4) {
        float u[4];
        philox_block(stream, s, purpose, (u64)q, u);
        for (int k = 0; k < 4 && 4 * q + k < n; k++) out[4 * q + k] = u[k];
    }
}

extern "C" __global__ void bernoulli_keep(float* out, long long n, float p, u64 stream,
                                          const u32* step, u32 purpose) {
    u32 s = *step;
    GRID_STRIDE(q, (n + 3) / 4) {
        float u[4];
        philox_block(stream, s, purpose, (u64)q, u);
        for (int k = 0; k < 4 && 4 * q + k < n; k++) out[4 * q + k] = u[k] >= p ? 1.0f : 0.0f;
    }
}

template <typename X>
__device__ __forceinline__ void dropout_fwd_t(const X* x, X* y, float* mask, long long n, float p,
                                              u64 stream, const u32* step, u32 purpose) {
    u32 s = *step;
    float keep = 1.0f / (1.0f - p);
    GRID_STRIDE(q, (n + 3) / 4) {
        float u[4];
        philox_block(stream, s, purpose, (u64)q, u);
        for (int k = 0; k < 4 && 4 * q + k < n; k++) {
            long long i = 4 * q + k;
            float m = u[k] >= p ? keep : 0.0f;
            mask[i] = m;
            st_act(y, i, ld_act(x, i) * m);
        }
    }
}
ACT_TWINS(dropout_fwd,
          (const float* x, float* y, float* mask, long long n, float p, u64 stream,
           const u32* step, u32 purpose),
          (const u16* x, u16* y, float* mask, long long n, float p, u64 stream, const u32* step,
           u32 purpose),
          (x, y, mask, n, p, stream, step, purpose))

// y = dropout(relu(y + bias)) in place for y [n / c, c], without a bias where bias is null (a
// linear layer, its ReLU and a dropout): dropout_fwd's blocks of four draws and mask, so the
// same bits as the three layers; the mask is not stored (backward reads it from y).
extern "C" __global__ void add_row_bias_relu_dropout(float* y, const float* bias, long long n,
                                                     int c, float p, u64 stream, const u32* step,
                                                     u32 purpose) {
    u32 s = *step;
    float keep = 1.0f / (1.0f - p);
    GRID_STRIDE(q, (n + 3) / 4) {
        float u[4];
        philox_block(stream, s, purpose, (u64)q, u);
        int col = bias ? (int)((4 * q) % c) : 0;  // (one 64-bit division per four elements)
        for (int k = 0; k < 4 && 4 * q + k < n; k++) {
            long long i = 4 * q + k;
            float v = y[i];
            if (bias) {
                v += bias[col];
                if (++col == c) col = 0;
            }
            v = v <= 0.0f ? 0.0f : v;
            y[i] = v * (u[k] >= p ? keep : 0.0f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Element-wise arithmetic

extern "C" __global__ void axpy(float alpha, const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = y[i] + alpha * x[i];
}
extern "C" __global__ void scale(float* x, float alpha, long long n) {
    GRID_STRIDE(i, n) x[i] = x[i] * alpha;
}
extern "C" __global__ void add(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}
extern "C" __global__ void mul(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = a[i] * b[i];
}
extern "C" __global__ void scale_rows(const float* x, const float* s, float* y, long long rows,
                                      long long row) {
    PLANE_LOOP(r, i, rows, row) y[r * row + i] = x[r * row + i] * s[r];
}
// f32::clamp keeps NaN.
extern "C" __global__ void clamp(float* x, float lo, float hi, long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        x[i] = v < lo ? lo : (v > hi ? hi : v);
    }
}
extern "C" __global__ void add_sign(float alpha, const float* w, float* g, long long n) {
    GRID_STRIDE(i, n) {
        float v = w[i];
        g[i] = g[i] + alpha * (v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f));
    }
}
// y[n, c, i] += bias[c] over [N, C, inner] (planes = N C).
extern "C" __global__ void add_channel_bias(float* y, const float* bias, long long planes, int c,
                                            long long inner) {
    PLANE_LOOP(pl, i, planes, inner) y[pl * inner + i] += bias[pl % c];
}
// The same for y [rows, c] (a linear layer's output: one value per plane, where
// add_channel_bias would run a block per value): rows on the grid's y axis, channels along x.
extern "C" __global__ void add_row_bias(float* y, const float* bias, long long rows, int c) {
    PLANE_LOOP(r, i, rows, c) y[r * c + i] += bias[i];
}

// y = relu(y + bias) in place for y [rows, c], without a bias where bias is null (a linear
// layer followed by a ReLU): add_row_bias's grid; the ReLU of unary_fwd (NaN propagates).
extern "C" __global__ void add_row_bias_relu(float* y, const float* bias, long long rows, int c) {
    PLANE_LOOP(r, i, rows, c) {
        float v = y[r * c + i];
        if (bias) v += bias[i];
        y[r * c + i] = v <= 0.0f ? 0.0f : v;
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic reductions. A block sums `per_block` consecutive elements (threads stride
// through them, then a fixed tree), writing one double partial; `finish_sum` adds the
// partials in order with one block.

#define RBLOCK 256

__device__ __forceinline__ double block_sum(double v) {
    __shared__ double sh[RBLOCK];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = RBLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

// op: 0 sum x, 1 sum |x|, 2 sum x^2, 3 count non-finite
extern "C" __global__ void reduce_partial(const float* x, long long n, long long per_block, int op,
                                          double* partial) {
    long long lo = (long long)blockIdx.x * per_block;
    long long hi = lo + per_block < n ? lo + per_block : n;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += RBLOCK) {
        float v = x[i];
        double d = (double)v;
        acc += op == 0 ? d : op == 1 ? fabs(d) : op == 2 ? d * d : (isfinite(v) ? 0.0 : 1.0);
    }
    double s = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out = f(sum of partials): mode 0 plain (as f32), 1 all-finite flag (1 if the count is 0),
// 2 mean (divide by `div`).
extern "C" __global__ void finish_sum(const double* partial, int count, int mode, double div,
                                      float* out) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += RBLOCK) acc += partial[i];
    double s = block_sum(acc);
    if (threadIdx.x == 0) {
        out[0] = mode == 0 ? (float)s : mode == 1 ? (s == 0.0 ? 1.0f : 0.0f) : (float)(s / div);
    }
}

// Global gradient norm over several tensors: partials of sum x^2 per tensor have been
// written (in tensor order) into `partial`; this adds them in order and writes the norm and
// PyTorch's clipping coefficient min(1, max_norm / (norm + 1e-6)) (NaN stays NaN).
extern "C" __global__ void finish_clip(const double* partial, int count, float max_norm,
                                       float* norm_out, float* coef_out) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += RBLOCK) acc += partial[i];
    double s = block_sum(acc);
    if (threadIdx.x == 0) {
        float norm = (float)sqrt(s);
        float coef = max_norm / (norm + 1e-6f);
        coef = coef < 1.0f ? coef : 1.0f;
        if (isnan(norm)) coef = norm;
        norm_out[0] = norm;
        coef_out[0] = coef;
    }
}

// dbias[c] += sum over n, i of dy[n, c, i]: one block per channel, samples in order.
extern "C" __global__ void channel_sum_acc(const float* dy, float* dbias, int nb, int c,
                                           long long inner) {
    int ch = blockIdx.x;
    double acc = 0.0;
    for (int s = 0; s < nb; s++) {
        const float* p = dy + ((long long)s * c + ch) * inner;
        for (long long i = threadIdx.x; i < inner; i += RBLOCK) acc += (double)p[i];
    }
    double t = block_sum(acc);
    if (threadIdx.x == 0) dbias[ch] += (float)t;
}

// dbias[ch] += the sum of column ch of dy [nb, c] (a linear layer's bias, where
// channel_sum_acc would read each column with one thread): 32 columns per block of
// ROW_SUM_WARPS warps (1024 threads), warp l summing rows l, l + 32, ... in order, its 32
// lanes reading a whole 128-byte row, so that a warp walks nb/32 rows (with 8 warps it was 64
// dependent steps at batch 512); the warps' partial sums are added in a fixed order.
#define ROW_SUM_WARPS 32

// The end of row_sum_acc and relu_row_sum_acc: each thread's sum of its column's rows (`acc`,
// for column `ch`) added over the block's warps in order into dbias[ch]. Every thread of the
// block calls it.
__device__ __forceinline__ void row_sum_finish(double acc, int ch, int c, float* dbias) {
    __shared__ double part[ROW_SUM_WARPS][32];
    int lc = threadIdx.x % 32, lane = threadIdx.x / 32;
    part[lane][lc] = acc;
    __syncthreads();
    if (lane == 0 && ch < c) {
        double t = 0.0;
        for (int l = 0; l < ROW_SUM_WARPS; l++) t += part[l][lc];
        dbias[ch] += (float)t;
    }
}

extern "C" __global__ void __launch_bounds__(ROW_SUM_WARPS * 32)
    row_sum_acc(const float* dy, float* dbias, int nb, int c) {
    int lc = threadIdx.x % 32, lane = threadIdx.x / 32;
    int ch = blockIdx.x * 32 + lc;
    double acc = 0.0;
    if (ch < c)
        for (int r = lane; r < nb; r += ROW_SUM_WARPS) acc += (double)dy[(long long)r * c + ch];
    row_sum_finish(acc, ch, c, dbias);
}

// The backward of add_row_bias_relu (keep = 1) or add_row_bias_relu_dropout (keep =
// 1 / (1 - p)) from its output y: dz = dy keep where y > 0 (NaN where y is NaN, else 0;
// unary_bwd's ReLU), written out, and dbias[ch] += the column sums of dz in row_sum_acc's
// blocks and order (so the same sums as the unfused layers) unless dbias is null. y is f32,
// or bf16 (y_bf16 = 1) as a linear layer keeps its output under bf16 activations.
extern "C" __global__ void __launch_bounds__(ROW_SUM_WARPS * 32)
    relu_row_sum_acc(const void* y, int y_bf16, const float* dy, float* dz, float* dbias, int nb,
                     int c, float keep) {
    int lc = threadIdx.x % 32, lane = threadIdx.x / 32;
    int ch = blockIdx.x * 32 + lc;
    double acc = 0.0;
    if (ch < c)
        for (int r = lane; r < nb; r += ROW_SUM_WARPS) {
            long long k = (long long)r * c + ch;
            float yv = y_bf16 ? bf16_to_f32(((const u16*)y)[k]) : ((const float*)y)[k];
            float g = yv > 0.0f ? dy[k] * keep : (isnan(yv) ? yv : 0.0f);
            dz[k] = g;
            acc += (double)g;
        }
    if (dbias) row_sum_finish(acc, ch, c, dbias);  // (dbias is the same for the whole block)
}

// ---------------------------------------------------------------------------------------
// Activations. op codes: 0 sigmoid, 1 tanh, 2 relu, 3 leaky relu(a), 4 elu(a), 5 selu,
// 6 softplus(a = beta, b = threshold), 7 gelu (erf), 8 mish, 9 swish(a = beta).

#define SELU_ALPHA 1.6732632f
#define SELU_SCALE 1.050701f

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplus(float x, float beta, float thr) {
    return x * beta > thr ? x : log1pf(expf(beta * x)) / beta;
}

__device__ __forceinline__ float act_fwd(int op, float x, float a, float b) {
    switch (op) {
    case 0: return sigm(x);
    case 1: return tanhf(x);
    case 2: return x <= 0.0f ? 0.0f : x;  // NaN propagates
    case 3: return x > 0.0f ? x : a * x;
    case 4: return x > 0.0f ? x : a * expm1f(x);
    case 5: return SELU_SCALE * (x > 0.0f ? x : SELU_ALPHA * expm1f(x));
    case 6: return softplus(x, a, b);
    case 7: return 0.5f * x * (1.0f + (float)erf((double)(x * 0.70710678f)));
    case 8: return x * tanhf(softplus(x, 1.0f, 20.0f));
    default: return x * sigm(a * x);
    }
}

__device__ __forceinline__ float act_grad(int op, float x, float y, float a, float b) {
    switch (op) {
    case 0: return y * (1.0f - y);
    case 1: return 1.0f - y * y;
    case 2: return x > 0.0f ? 1.0f : 0.0f;
    case 3: return x > 0.0f ? 1.0f : a;
    case 4: return x > 0.0f ? 1.0f : y + a;
    case 5: return x > 0.0f ? SELU_SCALE : SELU_SCALE * SELU_ALPHA * expf(x);
    case 6: return x * a > b ? 1.0f : sigm(a * x);
    case 7:
        return 0.5f * (1.0f + (float)erf((double)(x * 0.70710678f))) +
               x * 0.3989423f * expf(-0.5f * x * x);
    case 8: {
        float t = tanhf(softplus(x, 1.0f, 20.0f));
        return t + x * (1.0f - t * t) * sigm(x);
    }
    default: {
        float s = sigm(a * x);
        return s + a * x * s * (1.0f - s);
    }
    }
}

extern "C" __global__ void unary_fwd(int op, float a, float b, const float* x, float* y,
                                     long long n) {
    GRID_STRIDE(i, n) y[i] = act_fwd(op, x[i], a, b);
}

// ReLU's gradient lets NaN through (as the CPU).
extern "C" __global__ void unary_bwd(int op, float a, float b, const float* x, const float* y,
                                     const float* dy, float* dx, long long n) {
    GRID_STRIDE(i, n) {
        float xv = x[i];
        if (op == 2) {
            dx[i] = xv > 0.0f ? dy[i] : (isnan(xv) ? xv : 0.0f);
        } else {
            dx[i] = dy[i] * act_grad(op, xv, y[i], a, b);
        }
    }
}

// Swish with a learned beta read on the device.
extern "C" __global__ void swish_fwd(const float* x, const float* beta, float* y, long long n) {
    float b = beta[0];
    GRID_STRIDE(i, n) y[i] = x[i] * sigm(b * x[i]);
}
extern "C" __global__ void swish_bwd(const float* x, const float* beta, const float* dy,
                                     float* dx, long long n, long long per_block,
                                     double* partial) {
    float b = beta[0];
    long long lo = (long long)blockIdx.x * per_block;
    long long hi = lo + per_block < n ? lo + per_block : n;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += RBLOCK) {
        float xv = x[i], g = dy[i], s = sigm(b * xv);
        acc += (double)(g * xv * xv * s * (1.0f - s));
        dx[i] = g * (s + b * xv * s * (1.0f - s));
    }
    double t = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = t;
}
// target[0] += sum of partials (in order).
extern "C" __global__ void finish_acc(const double* partial, int count, float* target) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += RBLOCK) acc += partial[i];
    double s = block_sum(acc);
    if (threadIdx.x == 0) target[0] += (float)s;
}

// PReLU over [N, C, inner] with `na` slopes (1 or C).
extern "C" __global__ void prelu_fwd(const float* x, const float* a, float* y, long long planes,
                                     int c, long long inner, int na) {
    PLANE_LOOP(pl, i, planes, inner) {
        long long j = pl * inner + i;
        float v = x[j];
        float s = a[na == 1 ? 0 : pl % c];
        y[j] = v <= 0.0f ? v * s : v;
    }
}
// One block per slope k: dx for its channel(s) and da[k] += sum dy x over x <= 0.
extern "C" __global__ void prelu_bwd(const float* x, const float* a, const float* dy, float* dx,
                                     float* da, int nb, int c, long long inner, int na) {
    int k = blockIdx.x;
    double acc = 0.0;
    float s = a[k];
    for (int smp = 0; smp < nb; smp++) {
        for (int ch = (na == 1 ? 0 : k); ch < (na == 1 ? c : k + 1); ch++) {
            long long base = ((long long)smp * c + ch) * inner;
            for (long long i = threadIdx.x; i < inner; i += RBLOCK) {
                float xv = x[base + i], g = dy[base + i];
                if (xv <= 0.0f) {
                    acc += (double)(g * xv);
                    dx[base + i] = g * s;
                } else {
                    dx[base + i] = g;
                }
            }
        }
    }
    double t = block_sum(acc);
    if (threadIdx.x == 0) da[k] += (float)t;
}

// Softmax over axis 1 of [N, C, inner]: one thread per (n, i) column.
extern "C" __global__ void softmax_fwd(const float* x, float* y, long long cols, int c,
                                       long long inner) {
    GRID_STRIDE(col, cols) {
        long long nidx = col / inner, i = col % inner;
        const float* xb = x + nidx * c * inner + i;
        float* yb = y + nidx * c * inner + i;
        float mx = -INFINITY;
        for (int k = 0; k < c; k++) mx = fmaxf(mx, xb[k * inner]);
        double s = 0.0;
        for (int k = 0; k < c; k++) {
            float e = expf(xb[k * inner] - mx);
            yb[k * inner] = e;
            s += (double)e;
        }
        float inv = (float)(1.0 / s);
        for (int k = 0; k < c; k++) yb[k * inner] *= inv;
    }
}
extern "C" __global__ void softmax_bwd(const float* y, const float* dy, float* dx, long long cols,
                                       int c, long long inner) {
    GRID_STRIDE(col, cols) {
        long long base = (col / inner) * c * inner + col % inner;
        float dot = 0.0f;
        for (int k = 0; k < c; k++) dot += y[base + k * inner] * dy[base + k * inner];
        for (int k = 0; k < c; k++) {
            long long j = base + k * inner;
            dx[j] = y[j] * (dy[j] - dot);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Convolution by im2col + GEMM. The column matrix is [K, N P] (K = C KH KW, P = OH OW),
// columns ordered (sample, position), so that one GEMM covers the whole batch:
// Y' [OC, N P] = W [OC, K] col, then Y [N, OC, P] is Y' with the first two axes swapped.

// Row `r` of the column matrix (channel ci, kernel offset ki, kj) on the y axis of the grid;
// its N P columns on the x axis.
template <typename T>
__device__ void im2col_impl(const T* x, T* col, int nb, int c, int h, int w, int kh, int kw,
                            int stride, int pad, int oh, int ow, T zero) {
    unsigned p = (unsigned)oh * ow, np = (unsigned)nb * p;
    int rows = c * kh * kw;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        int kj = r % kw, ki = (r / kw) % kh, ci = r / (kw * kh);
        T* out = col + (long long)r * np;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < np; j += blockDim.x * gridDim.x) {
            unsigned smp = j / p, pos = j - smp * p;
            int oy = (int)(pos / ow), ox = (int)(pos - (unsigned)oy * ow);
            int iy = oy * stride + ki - pad, ix = ox * stride + kj - pad;
            T v = zero;
            if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                v = x[((long long)smp * c + ci) * h * w + iy * w + ix];
            out[j] = v;
        }
    }
}
extern "C" __global__ void im2col_f32(const float* x, float* col, int nb, int c, int h, int w,
                                      int kh, int kw, int stride, int pad, int oh, int ow) {
    im2col_impl<float>(x, col, nb, c, h, w, kh, kw, stride, pad, oh, ow, 0.0f);
}
extern "C" __global__ void im2col_u16(const u16* x, u16* col, int nb, int c, int h, int w,
                                      int kh, int kw, int stride, int pad, int oh, int ow) {
    im2col_impl<u16>(x, col, nb, c, h, w, kh, kw, stride, pad, oh, ow, (u16)0);
}

// dx [N, C, H, W] = col2im(dcol [K, N P]): each input element gathers every window entry that
// read it (no atomics: deterministic). Planes (sample, channel) on the y axis.
extern "C" __global__ void col2im(const float* dcol, float* dx, int nb, int c, int h, int w,
                                  int kh, int kw, int stride, int pad, int oh, int ow) {
    unsigned p = (unsigned)oh * ow;
    long long np = (long long)nb * p;
    PLANE_LOOP(pl, i, (long long)nb * c, (unsigned)(h * w)) {
        int smp = (int)(pl / c), ci = (int)(pl % c);
        int iy = (int)(i / (unsigned)w), ix = (int)(i - (unsigned)iy * w);
        const float* base = dcol + (long long)smp * p;
        float acc = 0.0f;
        for (int ki = 0; ki < kh; ki++) {
            int ty = iy + pad - ki;
            if (ty < 0) continue;
            int oy = ty / stride;
            if (oy * stride != ty || oy >= oh) continue;
            for (int kj = 0; kj < kw; kj++) {
                int tx = ix + pad - kj;
                if (tx < 0) continue;
                int ox = tx / stride;
                if (ox * stride != tx || ox >= ow) continue;
                long long row = ((long long)ci * kh + ki) * kw + kj;
                acc += base[row * np + oy * ow + ox];
            }
        }
        dx[pl * h * w + i] = acc;
    }
}

// dy' [OC, N P] from dy [N, OC, P], in f32 or rounded to 16 bits (mode 0 f32, 1 bf16, 2 f16).
extern "C" __global__ void conv_dy_t(const float* dy, void* out, int nb, int oc, long long p,
                                     int mode) {
    PLANE_LOOP(pl, i, (long long)nb * oc, p) {
        int smp = (int)(pl / oc), o = (int)(pl % oc);
        long long j = ((long long)o * nb + smp) * p + i;
        float v = dy[pl * p + i];
        if (mode == 0) ((float*)out)[j] = v;
        else if (mode == 1) ((u16*)out)[j] = f32_to_bf16(v);
        else ((u16*)out)[j] = f32_to_f16(v);
    }
}

// ---------------------------------------------------------------------------------------
// Pooling

// Max pooling over clipped windows; first maximum wins, NaN propagates; positions in-plane.
extern "C" __global__ void max_pool_fwd(const float* x, float* y, u32* idx, long long planes,
                                        int h, int w, int oh, int ow, int kh, int kw, int stride,
                                        int pad) {
    PLANE_LOOP(pl, i, planes, (unsigned)(oh * ow)) {
        int oy = (int)(i / (unsigned)ow), ox = (int)(i - (unsigned)oy * ow);
        long long o = pl * oh * ow + i;
        const float* xp = x + pl * h * w;
        int r0 = oy * stride - pad, c0 = ox * stride - pad;
        int r1 = min(r0 + kh, h), c1 = min(c0 + kw, w);
        r0 = max(r0, 0);
        c0 = max(c0, 0);
        float best = -INFINITY;
        u32 at = (u32)(r0 * w + c0);
        for (int iy = r0; iy < r1; iy++)
            for (int ix = c0; ix < c1; ix++) {
                float v = xp[iy * w + ix];
                if (!isnan(best) && (v > best || isnan(v))) {
                    best = v;
                    at = (u32)(iy * w + ix);
                }
            }
        y[o] = best;
        idx[o] = at;
    }
}

// dx[plane, idx[j]] += dy[plane, j] (dx zeroed first). Atomics: with overlapping windows the
// order of additions is not fixed (non-overlapping windows, the common case, are exact).
extern "C" __global__ void max_bwd(const float* dy, const u32* idx, float* dx, long long n,
                                   long long dy_plane, long long x_plane) {
    GRID_STRIDE(j, n) {
        long long pl = j / dy_plane;
        atomicAdd(dx + pl * x_plane + idx[j], dy[j]);
    }
}

extern "C" __global__ void avg_pool_fwd(const float* x, float* y, long long planes, int h, int w,
                                        int oh, int ow, int kh, int kw, int stride, int pad) {
    float inv = 1.0f / (float)(kh * kw);
    PLANE_LOOP(pl, i, planes, (unsigned)(oh * ow)) {
        int oy = (int)(i / (unsigned)ow), ox = (int)(i - (unsigned)oy * ow);
        long long o = pl * oh * ow + i;
        const float* xp = x + pl * h * w;
        int r0 = oy * stride - pad, c0 = ox * stride - pad;
        int r1 = min(r0 + kh, h), c1 = min(c0 + kw, w);
        r0 = max(r0, 0);
        c0 = max(c0, 0);
        float s = 0.0f;
        for (int iy = r0; iy < r1; iy++) {
            float row = 0.0f;
            for (int ix = c0; ix < c1; ix++) row += xp[iy * w + ix];
            s += row;
        }
        y[o] = s * inv;
    }
}
// Each input gathers the outputs whose window covers it.
extern "C" __global__ void avg_pool_bwd(const float* dy, float* dx, long long planes, int h, int w,
                                        int oh, int ow, int kh, int kw, int stride, int pad) {
    float inv = 1.0f / (float)(kh * kw);
    PLANE_LOOP(pl, j, planes, (unsigned)(h * w)) {
        int iy = (int)(j / (unsigned)w), ix = (int)(j - (unsigned)iy * w);
        long long i = pl * h * w + j;
        const float* dp = dy + pl * oh * ow;
        float acc = 0.0f;
        for (int oy = 0; oy < oh; oy++) {
            int r0 = oy * stride - pad;
            if (iy < max(r0, 0) || iy >= min(r0 + kh, h)) continue;
            for (int ox = 0; ox < ow; ox++) {
                int c0 = ox * stride - pad;
                if (ix < max(c0, 0) || ix >= min(c0 + kw, w)) continue;
                acc += dp[oy * ow + ox] * inv;
            }
        }
        dx[i] = acc;
    }
}

// Mean of each plane: one block per plane.
extern "C" __global__ void plane_mean(const float* x, float* y, long long inner) {
    const float* p = x + (long long)blockIdx.x * inner;
    double acc = 0.0;
    for (long long i = threadIdx.x; i < inner; i += RBLOCK) acc += (double)p[i];
    double s = block_sum(acc);
    if (threadIdx.x == 0) y[blockIdx.x] = (float)(s / (double)inner);
}
extern "C" __global__ void plane_broadcast(const float* dy, float* dx, long long planes,
                                           long long inner) {
    float invf = 1.0f / (float)inner;
    PLANE_LOOP(pl, i, planes, inner) dx[pl * inner + i] = dy[pl] * invf;
}

// PyTorch's interval rule for fractional max pooling (as pool::fractional_starts).
__device__ __forceinline__ int frac_start(float u, int n, int out, int k, int i) {
    if (i == out - 1) return n - k;
    float alpha = (float)(n - k) / (float)(out - 1);
    return (int)((long long)(((float)i + u) * alpha) - (long long)(u * alpha));
}
extern "C" __global__ void fractional_fwd(const float* x, const float* samples, float* y, u32* idx,
                                          long long planes, int h, int w, int oh, int ow, int kh,
                                          int kw) {
    PLANE_LOOP(pl, i, planes, (unsigned)(oh * ow)) {
        int oy = (int)(i / (unsigned)ow), ox = (int)(i - (unsigned)oy * ow);
        long long o = pl * oh * ow + i;
        const float* xp = x + pl * h * w;
        int c0 = frac_start(samples[2 * pl], w, ow, kw, ox);
        int r0 = frac_start(samples[2 * pl + 1], h, oh, kh, oy);
        float best = -INFINITY;
        u32 at = (u32)(r0 * w + c0);
        for (int iy = r0; iy < r0 + kh; iy++)
            for (int ix = c0; ix < c0 + kw; ix++) {
                float v = xp[iy * w + ix];
                if (!isnan(best) && (v > best || isnan(v))) {
                    best = v;
                    at = (u32)(iy * w + ix);
                }
            }
        y[o] = best;
        idx[o] = at;
    }
}

// Maxout: rows of f k values, y[r, j] = max_i x[r, j k + i]; positions within the row.
extern "C" __global__ void max_groups_fwd(const float* x, float* y, u32* idx, long long n, int f,
                                          int k) {
    GRID_STRIDE(o, n) {
        long long r = o / f;
        int j = (int)(o % f);
        const float* xr = x + r * (long long)f * k;
        float best = -INFINITY;
        u32 at = (u32)(j * k);
        for (int i = 0; i < k; i++) {
            float v = xr[j * k + i];
            if (!isnan(best) && (v > best || isnan(v))) {
                best = v;
                at = (u32)(j * k + i);
            }
        }
        y[o] = best;
        idx[o] = at;
    }
}

// ---------------------------------------------------------------------------------------
// Batch normalization over [N, C, inner]. Statistics: block (c, s) covers samples
// [s N / S, (s + 1) N / S) of channel c and writes (count, mean, M2) in double; the finishing
// kernel merges the S parts in order with Chan et al.'s formula.
//
// Every kernel that reads x comes twice: for x (and y) in f32, and, with the suffix _h, in
// bf16 (bf16 activations), from one template (ACT_TWINS, at the top).

template <typename X>
__device__ __forceinline__ void bn_stats_partial_t(const X* x, int nb, int c, long long inner,
                                                   int splits, double* part) {
    int ch = blockIdx.x, s = blockIdx.y;
    int n0 = (int)((long long)s * nb / splits), n1 = (int)((long long)(s + 1) * nb / splits);
    double sum = 0.0;
    for (int smp = n0; smp < n1; smp++) {
        const X* p = x + ((long long)smp * c + ch) * inner;
        for (long long i = threadIdx.x; i < inner; i += RBLOCK) sum += (double)ld_act(p, i);
    }
    double total = block_sum(sum);
    double cnt = (double)(n1 - n0) * (double)inner;
    double mean = cnt > 0.0 ? total / cnt : 0.0;
    double m2 = 0.0;
    for (int smp = n0; smp < n1; smp++) {
        const X* p = x + ((long long)smp * c + ch) * inner;
        for (long long i = threadIdx.x; i < inner; i += RBLOCK) {
            double d = (double)ld_act(p, i) - mean;
            m2 += d * d;
        }
    }
    double m2t = block_sum(m2);
    if (threadIdx.x == 0) {
        double* o = part + ((long long)ch * splits + s) * 3;
        o[0] = cnt;
        o[1] = mean;
        o[2] = m2t;
    }
}
ACT_TWINS(bn_stats_partial,
         (const float* x, int nb, int c, long long inner, int splits, double* part),
         (const u16* x, int nb, int c, long long inner, int splits, double* part),
         (x, nb, c, inner, splits, part))

// Batch norm's output z = x scale + shift, each operation rounded (as the CPU computes it), in
// every kernel that normalizes: the fused and unfused passes give the same bits, and the fused
// backward finds the forward's ReLU mask again bit for bit.
__device__ __forceinline__ float bn_z(float x, float sc, float sh) {
    return __fadd_rn(__fmul_rn(x, sc), sh);
}

// scale = gamma invstd and shift = beta - mean scale, each operation rounded (as the CPU
// backend's `Affine`): the fused backward below recomputes them from mean and invstd and must
// find the forward's values bit for bit.
__device__ __forceinline__ void bn_affine(float gamma, float beta, float mean, float invstd,
                                          float* sc, float* sh) {
    *sc = __fmul_rn(gamma, invstd);
    *sh = __fsub_rn(beta, __fmul_rn(mean, *sc));
}

// Per channel: mean, invstd (f32, for backward), scale and shift for the normalization, and
// the running averages (variance unbiased).
extern "C" __global__ void bn_stats_finish(const double* part, int c, int splits, float eps,
                                           float momentum, const float* gamma, const float* beta,
                                           float* mean_out, float* invstd_out, float* scale,
                                           float* shift, float* run_mean, float* run_var) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int s = 0; s < splits; s++) {
        const double* p = part + ((long long)ch * splits + s) * 3;
        double nb = p[0];
        if (nb == 0.0) continue;
        double tot = n + nb, delta = p[1] - mean;
        mean += delta * nb / tot;
        m2 += p[2] + delta * delta * n * nb / tot;
        n = tot;
    }
    double var = m2 / (n > 1.0 ? n : 1.0);
    float invstd = (float)(1.0 / sqrt(var + (double)eps));
    float meanf = (float)mean;
    mean_out[ch] = meanf;
    invstd_out[ch] = invstd;
    float sc, sh;
    bn_affine(gamma[ch], beta[ch], meanf, invstd, &sc, &sh);
    scale[ch] = sc;
    shift[ch] = sh;
    float m = (float)n;
    float unbias = m > 1.0f ? m / (m - 1.0f) : 1.0f;
    run_mean[ch] = (1.0f - momentum) * run_mean[ch] + momentum * meanf;
    run_var[ch] = (1.0f - momentum) * run_var[ch] + momentum * (float)var * unbias;
}

template <typename X>
__device__ __forceinline__ void bn_eval_t(const X* x, const float* gamma, const float* beta,
                                          const float* mean, const float* invstd, X* y,
                                          long long planes, int c, long long inner) {
    PLANE_LOOP(pl, i, planes, inner) {
        int ch = (int)(pl % c);
        long long j = pl * inner + i;
        st_act(y, j, gamma[ch] * (ld_act(x, j) - mean[ch]) * invstd[ch] + beta[ch]);
    }
}
ACT_TWINS(bn_eval,
         (const float* x, const float* gamma, const float* beta, const float* mean,
          const float* invstd, float* y, long long planes, int c, long long inner),
         (const u16* x, const float* gamma, const float* beta, const float* mean,
          const float* invstd, u16* y, long long planes, int c, long long inner),
         (x, gamma, beta, mean, invstd, y, planes, c, inner))
extern "C" __global__ void invstd_kernel(const float* var, float* out, float eps, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)(1.0 / sqrt((double)var[i] + (double)eps));
}

// dbeta += sum dy, dgamma += sum dy xhat; coefficients of dx per channel.
extern "C" __global__ void bn_bwd_finish(const double* part, int c, int splits, double m,
                                         float* dgamma, float* dbeta, float* mean_dy,
                                         float* mean_dyx) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double a = 0.0, b = 0.0;
    for (int s = 0; s < splits; s++) {
        a += part[((long long)ch * splits + s) * 2];
        b += part[((long long)ch * splits + s) * 2 + 1];
    }
    dbeta[ch] += (float)a;
    dgamma[ch] += (float)b;
    mean_dy[ch] = (float)(a / m);
    mean_dyx[ch] = (float)(b / m);
}
template <typename X>
__device__ __forceinline__ void bn_bwd_dx_t(const X* x, const float* dy, const float* gamma,
                                            const float* mean, const float* invstd,
                                            const float* mean_dy, const float* mean_dyx,
                                            int batch_stats, float* dx, long long planes, int c,
                                            long long inner) {
    PLANE_LOOP(pl, j, planes, inner) {
        int ch = (int)(pl % c);
        long long i = pl * inner + j;
        float is = invstd[ch];
        if (batch_stats) {
            float xhat = (ld_act(x, i) - mean[ch]) * is;
            dx[i] = gamma[ch] * is * (dy[i] - mean_dy[ch] - xhat * mean_dyx[ch]);
        } else {
            dx[i] = gamma[ch] * is * dy[i];
        }
    }
}
ACT_TWINS(bn_bwd_dx,
         (const float* x, const float* dy, const float* gamma, const float* mean,
          const float* invstd, const float* mean_dy, const float* mean_dyx, int batch_stats,
          float* dx, long long planes, int c, long long inner),
         (const u16* x, const float* dy, const float* gamma, const float* mean,
          const float* invstd, const float* mean_dy, const float* mean_dyx, int batch_stats,
          float* dx, long long planes, int c, long long inner),
         (x, dy, gamma, mean, invstd, mean_dy, mean_dyx, batch_stats, dx, planes, c, inner))

// ---------------------------------------------------------------------------------------
// Batch norm followed by a ReLU (after = 1), or by a ReLU and a 2x2 max pool of stride 2
// (after = 2), in batch norm's own passes (the CPU backend's norm.rs, After::Relu and
// After::ReluPool2x2): the ReLU's output is never stored, nor the pool's arg-max; backward
// finds both again from x and the statistics. z = x scale + shift is computed as the CPU
// does, each operation rounded, so the forward and backward agree on every mask bit for bit.

// The ReLU layer's rule: zero where z <= 0, z elsewhere (NaN propagates).
__device__ __forceinline__ float bn_relu(float z) { return z <= 0.0f ? 0.0f : z; }
// The gradient through a ReLU of input z: g where z > 0, NaN where z is NaN, else 0.
__device__ __forceinline__ float bn_relu_grad(float z, float g) {
    return z > 0.0f ? g : (z != z ? z : 0.0f);
}
// The max pool's rule: a later value is taken when above the best so far or NaN, unless the
// best is NaN already.
__device__ __forceinline__ bool bn_pool_takes(float best, float v) {
    return !(v <= best) && best == best;
}

// y = x scale + shift over [N, C, inner] (bn_apply), then the ReLU with RELU (bn_relu_apply).
template <typename X, bool RELU = false>
__device__ __forceinline__ void bn_apply_t(const X* x, const float* scale, const float* shift,
                                           X* y, long long planes, int c, long long inner) {
    PLANE_LOOP(pl, i, planes, inner) {
        int ch = (int)(pl % c);
        long long j = pl * inner + i;
        float z = bn_z(ld_act(x, j), scale[ch], shift[ch]);
        st_act(y, j, RELU ? bn_relu(z) : z);
    }
}
template <typename X>
__device__ __forceinline__ void bn_relu_apply_t(const X* x, const float* scale,
                                                const float* shift, X* y, long long planes,
                                                int c, long long inner) {
    bn_apply_t<X, true>(x, scale, shift, y, planes, c, inner);
}
ACT_TWINS(bn_apply,
         (const float* x, const float* scale, const float* shift, float* y, long long planes,
          int c, long long inner),
         (const u16* x, const float* scale, const float* shift, u16* y, long long planes, int c,
          long long inner),
         (x, scale, shift, y, planes, c, inner))
ACT_TWINS(bn_relu_apply,
         (const float* x, const float* scale, const float* shift, float* y, long long planes,
          int c, long long inner),
         (const u16* x, const float* scale, const float* shift, u16* y, long long planes, int c,
          long long inner),
         (x, scale, shift, y, planes, c, inner))

// y [N, C, h / 2, w / 2] = maxpool2x2(relu(x scale + shift)) of x [N, C, h, w]: each window in
// row-major order, the first maximum kept (bn_pool_takes).
template <typename X>
__device__ __forceinline__ void bn_relu_pool_apply_t(const X* x, const float* scale,
                                                     const float* shift, X* y, long long planes,
                                                     int c, int h, int w) {
    const int oh = h / 2, ow = w / 2;
    PLANE_LOOP(pl, o, planes, (long long)oh * ow) {
        int ch = (int)(pl % c);
        float sc = scale[ch], sh = shift[ch];
        int oy = o / ow, ox = o - oy * ow;
        const X* p = x + pl * h * w + (2 * oy) * w + 2 * ox;
        float best = bn_relu(bn_z(ld_act(p, 0), sc, sh));
        float v[3] = {ld_act(p, 1), ld_act(p, w), ld_act(p, w + 1)};
        for (int k = 0; k < 3; k++) {
            float r = bn_relu(bn_z(v[k], sc, sh));
            best = bn_pool_takes(best, r) ? r : best;
        }
        st_act(y, pl * oh * ow + o, best);
    }
}
ACT_TWINS(bn_relu_pool_apply,
         (const float* x, const float* scale, const float* shift, float* y, long long planes,
          int c, int h, int w),
         (const u16* x, const float* scale, const float* shift, u16* y, long long planes, int c,
          int h, int w),
         (x, scale, shift, y, planes, c, h, w))

// The gradient of batch norm's output at element i of plane pl (z its output there), from the
// gradient dy of what followed: dy itself (after 0), through the ReLU (after 1: dy as x), or
// through the pool then
// the ReLU (after 2: dy [planes, h / 2, w / 2]; the window's maximum found again by the pool's
// rule gets the window's gradient, the others 0, as the pool's backward adds onto zeros).
template <typename X>
__device__ __forceinline__ float bn_after_grad(int after, const X* x, const float* dy,
                                               long long pl, long long i, float z, float sc,
                                               float sh, int h, int w) {
    if (after == 0) return dy[pl * h * w + i];
    if (after == 1) return bn_relu_grad(z, dy[pl * h * w + i]);
    const int oh = h / 2, ow = w / 2;
    int yy = (int)(i / w), xx = (int)(i - (long long)yy * w);
    if (yy >= 2 * oh || xx >= 2 * ow) return bn_relu_grad(z, 0.0f);
    int oy = yy / 2, ox = xx / 2;
    const X* p = x + pl * h * w + (2 * oy) * w + 2 * ox;
    float best = bn_relu(bn_z(ld_act(p, 0), sc, sh));
    int arg = 0;
    float v[3] = {ld_act(p, 1), ld_act(p, w), ld_act(p, w + 1)};
    for (int k = 0; k < 3; k++) {
        float r = bn_relu(bn_z(v[k], sc, sh));
        if (bn_pool_takes(best, r)) {
            best = r;
            arg = k + 1;
        }
    }
    float d = __fadd_rn(0.0f, dy[pl * oh * ow + oy * ow + ox]);
    return bn_relu_grad(z, arg == (yy % 2) * 2 + xx % 2 ? d : 0.0f);
}

// Backward sums per channel for batch norm followed by `after` (x [N, C, h w], dy as
// bn_after_grad takes it): part (c, s) = (sum g, sum g xhat) in double, g the gradient of batch
// norm's output. `beta` is read only after a ReLU.
template <typename X>
__device__ __forceinline__ void bn_after_bwd_partial_t(const X* x, const float* dy,
                                                       const float* gamma, const float* beta,
                                                       const float* mean, const float* invstd,
                                                       int nb, int c, int h, int w, int after,
                                                       int splits, double* part) {
    int ch = blockIdx.x, s = blockIdx.y;
    int n0 = (int)((long long)s * nb / splits), n1 = (int)((long long)(s + 1) * nb / splits);
    float mu = mean[ch], is = invstd[ch], sc, sh;
    bn_affine(gamma[ch], after ? beta[ch] : 0.0f, mu, is, &sc, &sh);
    long long inner = (long long)h * w;
    double a = 0.0, b = 0.0;
    for (int smp = n0; smp < n1; smp++) {
        long long pl = (long long)smp * c + ch, base = pl * inner;
        for (long long i = threadIdx.x; i < inner; i += RBLOCK) {
            float xv = ld_act(x, base + i);
            float g = bn_after_grad(after, x, dy, pl, i, bn_z(xv, sc, sh), sc, sh, h, w);
            float xhat = (xv - mu) * is;
            a += (double)g;
            b += (double)(g * xhat);
        }
    }
    double ta = block_sum(a);
    double tb = block_sum(b);
    if (threadIdx.x == 0) {
        double* o = part + ((long long)ch * splits + s) * 2;
        o[0] = ta;
        o[1] = tb;
    }
}
ACT_TWINS(bn_after_bwd_partial,
         (const float* x, const float* dy, const float* gamma, const float* beta,
          const float* mean, const float* invstd, int nb, int c, int h, int w, int after,
          int splits, double* part),
         (const u16* x, const float* dy, const float* gamma, const float* beta, const float* mean,
          const float* invstd, int nb, int c, int h, int w, int after, int splits, double* part),
         (x, dy, gamma, beta, mean, invstd, nb, c, h, w, after, splits, part))

// bn_bwd_dx (batch statistics) for batch norm followed by `after`.
template <typename X>
__device__ __forceinline__ void bn_after_bwd_dx_t(const X* x, const float* dy, const float* gamma,
                                                  const float* beta, const float* mean,
                                                  const float* invstd, const float* mean_dy,
                                                  const float* mean_dyx, float* dx,
                                                  long long planes, int c, int h, int w,
                                                  int after) {
    long long inner = (long long)h * w;
    PLANE_LOOP(pl, i, planes, inner) {
        int ch = (int)(pl % c);
        long long j = pl * inner + i;
        float mu = mean[ch], is = invstd[ch], sc, sh;
        bn_affine(gamma[ch], beta[ch], mu, is, &sc, &sh);
        float xv = ld_act(x, j);
        float g = bn_after_grad(after, x, dy, pl, i, bn_z(xv, sc, sh), sc, sh, h, w);
        float xhat = (xv - mu) * is;
        dx[j] = gamma[ch] * is * (g - mean_dy[ch] - xhat * mean_dyx[ch]);
    }
}
ACT_TWINS(bn_after_bwd_dx,
         (const float* x, const float* dy, const float* gamma, const float* beta,
          const float* mean, const float* invstd, const float* mean_dy, const float* mean_dyx,
          float* dx, long long planes, int c, int h, int w, int after),
         (const u16* x, const float* dy, const float* gamma, const float* beta, const float* mean,
          const float* invstd, const float* mean_dy, const float* mean_dyx, float* dx,
          long long planes, int c, int h, int w, int after),
         (x, dy, gamma, beta, mean, invstd, mean_dy, mean_dyx, dx, planes, c, h, w, after))

// ---------------------------------------------------------------------------------------
// Batch norm over features, x [N, C] (inner 1), alone or followed by a ReLU: the plane kernels
// above would give each value a plane of its own, and each channel's sums to one thread
// reading a column. Here a block takes 32 channels and its eight warps the rows (warp l rows
// l, l + 8, ...; a warp's lanes read 32 neighbouring channels of a row), and the partial
// results of (channel, warp) are laid out as 8 splits for bn_stats_finish and bn_bwd_finish,
// which merge them in order. No barrier in the sums: a thread past the channels returns.

template <typename X>
__device__ __forceinline__ void bn_row_stats_partial_t(const X* x, int nb, int c, double* part) {
    int lc = threadIdx.x % 32, lane = threadIdx.x / 32, ch = blockIdx.x * 32 + lc;
    if (ch >= c) return;
    double sum = 0.0, cnt = 0.0;
    for (int r = lane; r < nb; r += 8) {
        sum += (double)ld_act(x, (long long)r * c + ch);
        cnt += 1.0;
    }
    double mean = cnt > 0.0 ? sum / cnt : 0.0, m2 = 0.0;
    for (int r = lane; r < nb; r += 8) {
        double d = (double)ld_act(x, (long long)r * c + ch) - mean;
        m2 += d * d;
    }
    double* o = part + ((long long)ch * 8 + lane) * 3;
    o[0] = cnt;
    o[1] = mean;
    o[2] = m2;
}
ACT_TWINS(bn_row_stats_partial, (const float* x, int nb, int c, double* part),
         (const u16* x, int nb, int c, double* part), (x, nb, c, part))

// y = x scale + shift (bn_z), then the ReLU with `relu` (bn_apply's and bn_relu_apply's).
template <typename X>
__device__ __forceinline__ void bn_row_apply_t(const X* x, const float* scale, const float* shift,
                                               X* y, long long rows, int c, int relu) {
    PLANE_LOOP(r, ch, rows, c) {
        long long j = r * c + ch;
        float z = bn_z(ld_act(x, j), scale[ch], shift[ch]);
        st_act(y, j, relu ? bn_relu(z) : z);
    }
}
ACT_TWINS(bn_row_apply,
         (const float* x, const float* scale, const float* shift, float* y, long long rows, int c,
          int relu),
         (const u16* x, const float* scale, const float* shift, u16* y, long long rows, int c,
          int relu),
         (x, scale, shift, y, rows, c, relu))

// bn_eval's y = gamma (x - mean) invstd + beta.
template <typename X>
__device__ __forceinline__ void bn_row_eval_t(const X* x, const float* gamma, const float* beta,
                                              const float* mean, const float* invstd, X* y,
                                              long long rows, int c) {
    PLANE_LOOP(r, ch, rows, c) {
        long long j = r * c + ch;
        st_act(y, j, gamma[ch] * (ld_act(x, j) - mean[ch]) * invstd[ch] + beta[ch]);
    }
}
ACT_TWINS(bn_row_eval,
         (const float* x, const float* gamma, const float* beta, const float* mean,
          const float* invstd, float* y, long long rows, int c),
         (const u16* x, const float* gamma, const float* beta, const float* mean,
          const float* invstd, u16* y, long long rows, int c),
         (x, gamma, beta, mean, invstd, y, rows, c))

// The gradient of batch norm's output at x [r, ch]: dy, or with `relu` dy through the ReLU.
__device__ __forceinline__ float bn_row_grad(int relu, float xv, float g, float gamma, float beta,
                                             float mu, float is) {
    if (!relu) return g;
    float sc, sh;
    bn_affine(gamma, beta, mu, is, &sc, &sh);
    return bn_relu_grad(bn_z(xv, sc, sh), g);
}

// bn_after_bwd_partial's (sum g, sum g xhat) per (channel, warp). `beta` is read only with `relu`.
template <typename X>
__device__ __forceinline__ void bn_row_bwd_partial_t(const X* x, const float* dy,
                                                     const float* gamma, const float* beta,
                                                     const float* mean, const float* invstd,
                                                     int nb, int c, int relu, double* part) {
    int lc = threadIdx.x % 32, lane = threadIdx.x / 32, ch = blockIdx.x * 32 + lc;
    if (ch >= c) return;
    float mu = mean[ch], is = invstd[ch], ga = gamma[ch], be = relu ? beta[ch] : 0.0f;
    double a = 0.0, b = 0.0;
    for (int r = lane; r < nb; r += 8) {
        long long j = (long long)r * c + ch;
        float xv = ld_act(x, j);
        float g = bn_row_grad(relu, xv, dy[j], ga, be, mu, is);
        float xhat = (xv - mu) * is;
        a += (double)g;
        b += (double)(g * xhat);
    }
    double* o = part + ((long long)ch * 8 + lane) * 2;
    o[0] = a;
    o[1] = b;
}
ACT_TWINS(bn_row_bwd_partial,
         (const float* x, const float* dy, const float* gamma, const float* beta,
          const float* mean, const float* invstd, int nb, int c, int relu, double* part),
         (const u16* x, const float* dy, const float* gamma, const float* beta, const float* mean,
          const float* invstd, int nb, int c, int relu, double* part),
         (x, dy, gamma, beta, mean, invstd, nb, c, relu, part))

// bn_bwd_dx (and bn_after_bwd_dx's ReLU) for x [N, C].
template <typename X>
__device__ __forceinline__ void bn_row_bwd_dx_t(const X* x, const float* dy, const float* gamma,
                                                const float* beta, const float* mean,
                                                const float* invstd, const float* mean_dy,
                                                const float* mean_dyx, int batch_stats, int relu,
                                                float* dx, long long rows, int c) {
    PLANE_LOOP(r, ch, rows, c) {
        long long j = r * c + ch;
        float is = invstd[ch], xv = ld_act(x, j);
        float g = bn_row_grad(relu, xv, dy[j], gamma[ch], relu ? beta[ch] : 0.0f, mean[ch], is);
        if (batch_stats) {
            float xhat = (xv - mean[ch]) * is;
            dx[j] = gamma[ch] * is * (g - mean_dy[ch] - xhat * mean_dyx[ch]);
        } else {
            dx[j] = gamma[ch] * is * g;
        }
    }
}
ACT_TWINS(bn_row_bwd_dx,
         (const float* x, const float* dy, const float* gamma, const float* beta,
          const float* mean, const float* invstd, const float* mean_dy, const float* mean_dyx,
          int batch_stats, int relu, float* dx, long long rows, int c),
         (const u16* x, const float* dy, const float* gamma, const float* beta, const float* mean,
          const float* invstd, const float* mean_dy, const float* mean_dyx, int batch_stats,
          int relu, float* dx, long long rows, int c),
         (x, dy, gamma, beta, mean, invstd, mean_dy, mean_dyx, batch_stats, relu, dx, rows, c))

// ---------------------------------------------------------------------------------------
// Losses and metrics. One warp per row of [N, C] logits.

// Per row: the loss (double, into row_loss) and dlogits = (p t_sum - t) * g, with target t
// from a hard label or a soft distribution, smoothed: (1 - eps) t + eps / C.
extern "C" __global__ void softmax_ce(const float* logits, const u32* labels, const float* soft,
                                      int nrows, int c, float smoothing, float g,
                                      double* row_loss, float* grad) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= nrows) return;
    const float* x = logits + (long long)warp * c;
    float* gr = grad + (long long)warp * c;
    float mx = -INFINITY;
    for (int k = lane; k < c; k += 32) mx = fmaxf(mx, x[k]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    double se = 0.0;
    for (int k = lane; k < c; k += 32) se += exp((double)(x[k] - mx));
    for (int o = 16; o > 0; o >>= 1) se += __shfl_xor_sync(0xffffffffu, se, o);
    double lse = (double)mx + log(se);
    float u = smoothing / (float)c;
    double tsum = 0.0, tdot = 0.0;
    for (int k = lane; k < c; k += 32) {
        float t = labels ? (labels[warp] == (u32)k ? 1.0f : 0.0f) : soft[(long long)warp * c + k];
        if (smoothing > 0.0f) t = (1.0f - smoothing) * t + u;
        tsum += (double)t;
        tdot += (double)t * (double)x[k];
    }
    for (int o = 16; o > 0; o >>= 1) {
        tsum += __shfl_xor_sync(0xffffffffu, tsum, o);
        tdot += __shfl_xor_sync(0xffffffffu, tdot, o);
    }
    for (int k = lane; k < c; k += 32) {
        float t = labels ? (labels[warp] == (u32)k ? 1.0f : 0.0f) : soft[(long long)warp * c + k];
        if (smoothing > 0.0f) t = (1.0f - smoothing) * t + u;
        double p = exp((double)x[k] - lse);
        gr[k] = ((float)(p * tsum) - t) * g;
    }
    if (lane == 0) row_loss[warp] = lse * tsum - tdot;
}

// Per row: 1 if the first arg-max equals the label.
extern "C" __global__ void correct_rows(const float* logits, const u32* labels, int nrows, int c,
                                        double* out) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= nrows) return;
    const float* x = logits + (long long)r * c;
    int best = 0;
    for (int k = 1; k < c; k++)
        if (x[k] > x[best]) best = k;
    out[r] = (u32)best == labels[r] ? 1.0 : 0.0;
}

extern "C" __global__ void mse_grad(const float* p, const float* q, float* grad, float g,
                                    long long n) {
    GRID_STRIDE(i, n) grad[i] = g * (p[i] - q[i]);
}
extern "C" __global__ void mse_partial(const float* p, const float* q, long long n,
                                       long long per_block, double* partial) {
    long long lo = (long long)blockIdx.x * per_block;
    long long hi = lo + per_block < n ? lo + per_block : n;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += RBLOCK) {
        double d = (double)(p[i] - q[i]);
        acc += d * d;
    }
    double s = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---------------------------------------------------------------------------------------
// Optimizer: the step counter and one multi-tensor update per rule.

extern "C" __global__ void increment(u32* counter, u32 by) { counter[0] += by; }

#ifdef __CUDACC__
// Holds the stream for `ns` nanoseconds of the GPU's global timer (one thread), so that the
// host can queue work behind it: the kernel trace (`CudaBackend::trace`) then times each
// operation back to back, with no wait for the host between them.
extern "C" __global__ void spin_wait(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
#endif

extern "C" __global__ void note_nonfinite(const float* loss, const u32* step, u32* first) {
    if (first[0] == 0u && !isfinite(loss[0])) first[0] = step[0] + 1u;
}

// One parameter tensor in a multi-tensor update.
struct ParamSlot {
    float* p;
    float* g;
    float* s0;
    float* s1;
    float* s2;
    long long n;
    long long first_block;  // blocks before this tensor's
    float lr_scale;
    float wd;
};

// rule: 0 sgd, 1 adagrad, 2 rmsprop, 3 adam. h: hyperparameters (f64, as the CPU):
// sgd [momentum, dampening, nesterov], adagrad [lr_decay, eps], rmsprop [alpha, eps, momentum,
// centered], adam [beta1, beta2, eps, amsgrad, decoupled]. lr[min(step - 1, lr_len - 1)] is the
// learning rate (a one-element tensor, or a schedule table). The gradient is scaled by
// grad_scale[0] when given, gets L2 decay (not AdamW), and is zeroed after use.
extern "C" __global__ void optim_update(const ParamSlot* slots, int nslots, int rule,
                                        double h0, double h1, double h2, double h3, double h4,
                                        const float* lr, int lr_len, const u32* step_ptr,
                                        const float* grad_scale, long long per_block) {
    // The tensor of this block (a short linear scan: models have tens of tensors).
    int t = 0;
    while (t + 1 < nslots && slots[t + 1].first_block <= (long long)blockIdx.x) t++;
    ParamSlot sl = slots[t];
    u64 step = (u64)step_ptr[0];
    int li = (int)(step - 1 < (u64)lr_len ? step - 1 : (u64)(lr_len - 1));
    float lr_p = lr[li] * sl.lr_scale;
    float coef = grad_scale ? grad_scale[0] : 1.0f;
    bool decoupled = rule == 3 && h4 != 0.0;
    float l2 = decoupled ? 0.0f : sl.wd;
    // Per-tensor scalars, in double as the CPU's step_scalars.
    float sc0 = lr_p, sc1 = 0.0f;
    if (rule == 1) sc0 = (float)((double)lr_p / (1.0 + (double)(step - 1) * h0));
    if (rule == 3) {
        float bc1 = (float)(1.0 - pow(h0, (double)step));
        sc1 = (float)sqrt(1.0 - pow(h1, (double)step));
        sc0 = lr_p / bc1;
    }
    long long lo = ((long long)blockIdx.x - sl.first_block) * per_block;
    long long hi = lo + per_block < sl.n ? lo + per_block : sl.n;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float theta = sl.p[i];
        float g = sl.g[i] * coef + l2 * theta;
        sl.g[i] = 0.0f;
        if (rule == 0) {
            float step_v = g;
            if (h0 != 0.0) {
                float mu = (float)h0, keep = (float)(1.0 - h1);
                float v = step == 1 ? g : mu * sl.s0[i] + keep * g;
                sl.s0[i] = v;
                step_v = h2 != 0.0 ? g + mu * v : v;
            }
            theta -= sc0 * step_v;
        } else if (rule == 1) {
            float s = sl.s0[i] + g * g;
            sl.s0[i] = s;
            theta -= sc0 * g / (sqrtf(s) + (float)h1);
        } else if (rule == 2) {
            float a = (float)h0, om = (float)(1.0 - h0), eps = (float)h1, mu = (float)h2;
            bool centered = h3 != 0.0;
            float sq = a * sl.s0[i] + om * g * g;
            sl.s0[i] = sq;
            float d;
            if (centered) {
                float av = sl.s1[i];
                av += om * (g - av);
                sl.s1[i] = av;
                d = sqrtf(sq - av * av) + eps;
            } else {
                d = sqrtf(sq) + eps;
            }
            if (h2 > 0.0) {
                float* bufp = centered ? sl.s2 : sl.s1;
                float b = mu * bufp[i] + g / d;
                bufp[i] = b;
                theta -= sc0 * b;
            } else {
                theta -= sc0 * g / d;
            }
        } else {
            if (decoupled) theta *= 1.0f - lr_p * sl.wd;
            float m = sl.s0[i];
            m += (float)(1.0 - h0) * (g - m);
            sl.s0[i] = m;
            float v = (float)h1 * sl.s1[i] + (float)(1.0 - h1) * g * g;
            sl.s1[i] = v;
            float second = v;
            if (h3 != 0.0) {
                float vm = fmaxf(sl.s2[i], v);
                sl.s2[i] = vm;
                second = vm;
            }
            float denom = sqrtf(second) / sc1 + (float)h2;
            theta -= sc0 * m / denom;
        }
        sl.p[i] = theta;
    }
}

// ---------------------------------------------------------------------------------------
// Data on the device: gather a batch of images by index, with random crop (zero padding) and
// horizontal flip drawn from Philox (stream, step, purpose, sample * 4 + k).

extern "C" __global__ void gather_augment(const float* images, const u32* labels_in,
                                          const u32* order, const u32* cursor, float* out,
                                          u32* labels_out, int b, int c, int h, int w, int pad,
                                          float flip_p, u64 stream, const u32* step,
                                          u32 purpose) {
    unsigned per = (unsigned)(c * h * w), hw = (unsigned)(h * w);
    u32 s = *step;
    u32 first = *cursor;
    PLANE_LOOP(smpl, r, b, per) {
        int smp = (int)smpl;
        long long idx = smpl * per + r;
        int ch = (int)(r / hw);
        unsigned rr = r - (unsigned)ch * hw;
        int y = (int)(rr / (unsigned)w), x = (int)(rr - (unsigned)y * w);
        u32 src = order[first + smp];
        int dy = 0, dx = 0;
        if (pad > 0) {
            dy = (int)(philox_uniform(stream, s, purpose, (u64)smp * 4 + 0) * (float)(2 * pad + 1)) - pad;
            dx = (int)(philox_uniform(stream, s, purpose, (u64)smp * 4 + 1) * (float)(2 * pad + 1)) - pad;
        }
        bool flip = flip_p > 0.0f && philox_uniform(stream, s, purpose, (u64)smp * 4 + 2) < flip_p;
        int sx = flip ? w - 1 - x : x;
        int iy = y + dy, ix = sx + dx;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = images[(long long)src * per + ((long long)ch * h + iy) * w + ix];
        out[idx] = v;
        if (r == 0) labels_out[smp] = labels_in[src];
    }
}

// ---------------------------------------------------------------------------------------
// The batch steps after the gather: one-hot labels, Mixup and CutMix (data/augment.rs
// documents the draws). The sequential draws below repeat rng.rs's `Rng::philox` (next_f64,
// normal, gamma, beta) and augment.rs's `cutmix_box` operation for operation, with explicit
// rounding (no fused multiply-add), so that both devices draw the same `l` and box (up to
// last-bit differences of CUDA's log, cos and pow against the host's).

// Draw j of 64 bits of (stream, step, purpose): the words 2j (high) and 2j + 1 (low).
__device__ __forceinline__ u64 philox_u64(u64 stream, u32 step, u32 purpose, u64 j) {
    u64 block = (2 * j) >> 2;
    u32 c[4] = {(u32)block, (u32)(block >> 32), step, purpose};
    philox(c, (u32)stream, (u32)(stream >> 32));
    int k = (int)((2 * j) & 3);
    return ((u64)c[k] << 32) | (u64)c[k + 1];
}
__device__ __forceinline__ int u64_below(u64 x, int n) { return (int)(((x >> 32) * (u64)n) >> 32); }

struct SeqRng {
    u64 stream;
    u32 step, purpose;
    u64 j;
};
__device__ double seq_f64(SeqRng* r) {
    u64 x = philox_u64(r->stream, r->step, r->purpose, r->j++);
    return __dmul_rn((double)(x >> 11), 1.0 / 9007199254740992.0);
}
__device__ double seq_normal(SeqRng* r) {
    double u1 = __dsub_rn(1.0, seq_f64(r));
    double u2 = seq_f64(r);
    return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(2.0 * 3.141592653589793, u2)));
}
// Gamma(shape, 1): Marsaglia & Tsang; for shape < 1, G(shape + 1) U^(1 / shape), U drawn first.
__device__ double seq_gamma(SeqRng* r, double shape) {
    double boost = -1.0, orig = shape;
    if (shape < 1.0) {
        boost = __dsub_rn(1.0, seq_f64(r));
        shape = __dadd_rn(shape, 1.0);
    }
    double d = __dsub_rn(shape, 1.0 / 3.0);
    double c = __ddiv_rn(1.0, sqrt(__dmul_rn(9.0, d)));
    double g;
    for (;;) {
        double x = seq_normal(r);
        double t = __dadd_rn(1.0, __dmul_rn(c, x));
        double v = __dmul_rn(__dmul_rn(t, t), t);
        if (v <= 0.0) continue;
        double u = __dsub_rn(1.0, seq_f64(r));
        double x2 = __dmul_rn(x, x);
        if (u < __dsub_rn(1.0, __dmul_rn(0.0331, __dmul_rn(x2, x2))) ||
            log(u) < __dadd_rn(__dmul_rn(__dmul_rn(0.5, x), x),
                               __dmul_rn(d, __dadd_rn(__dsub_rn(1.0, v), log(v))))) {
            g = __dmul_rn(d, v);
            break;
        }
    }
    if (boost >= 0.0) g = __dmul_rn(g, pow(boost, __ddiv_rn(1.0, orig)));
    return g;
}
__device__ __forceinline__ int clip_round(double v, int n) {
    double r = round(v);
    return (int)(r < 0.0 ? 0.0 : (r > (double)n ? (double)n : r));
}

// params: [label weight l, y0, y1, x0, x1] of a Mixup (no box: 0, h, 0, w unused) or CutMix.
extern "C" __global__ void mix_params(float* params, float alpha, int cutmix, int h, int w,
                                      u64 stream, const u32* step, u32 purpose) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    SeqRng r = {stream, *step, purpose, 0};
    double x = seq_gamma(&r, (double)alpha), y = seq_gamma(&r, (double)alpha);
    double s = __dadd_rn(x, y);
    float lam = s == 0.0 ? 0.5f : (float)__ddiv_rn(x, s);
    int y0 = 0, y1 = h, x0 = 0, x1 = w;
    if (cutmix) {
        double cut = sqrt(fmax(__dsub_rn(1.0, (double)lam), 0.0));
        double rw = __dmul_rn((double)w, cut), rh = __dmul_rn((double)h, cut);
        double rx = __dmul_rn((double)w, seq_f64(&r));
        double ry = __dmul_rn((double)h, seq_f64(&r));
        y0 = clip_round(__dsub_rn(ry, rh / 2.0), h);
        y1 = clip_round(__dadd_rn(ry, rh / 2.0), h);
        x0 = clip_round(__dsub_rn(rx, rw / 2.0), w);
        x1 = clip_round(__dadd_rn(rx, rw / 2.0), w);
        lam = __fsub_rn(1.0f, __fdiv_rn((float)((y1 - y0) * (x1 - x0)), (float)(h * w)));
    }
    params[0] = lam;
    params[1] = (float)y0;
    params[2] = (float)y1;
    params[3] = (float)x0;
    params[4] = (float)x1;
}

// Sample i with sample b - 1 - i: Mixup mixes every element, CutMix swaps the box; the soft
// labels mix with the label weight. Planes are the pairs (the middle sample of an odd batch
// pairs with itself).
extern "C" __global__ void mix_batch(float* x, float* soft, const float* params, int b, int k,
                                     int h, int w, unsigned per, int cutmix) {
    float lam = params[0], rest = __fsub_rn(1.0f, lam);
    int y0 = (int)params[1], y1 = (int)params[2], x0 = (int)params[3], x1 = (int)params[4];
    unsigned inner = per > (unsigned)k ? per : (unsigned)k, hw = (unsigned)(h * w);
    PLANE_LOOP(pl, r, (b + 1) / 2, inner) {
        long long i = pl, j = b - 1 - pl;
        if (r < per) {
            float p = x[i * per + r], q = x[j * per + r];
            if (!cutmix) {
                x[i * per + r] = __fadd_rn(__fmul_rn(lam, p), __fmul_rn(rest, q));
                x[j * per + r] = __fadd_rn(__fmul_rn(lam, q), __fmul_rn(rest, p));
            } else {
                unsigned rr = r % hw;
                int yy = (int)(rr / (unsigned)w), xx = (int)(rr % (unsigned)w);
                if (yy >= y0 && yy < y1 && xx >= x0 && xx < x1) {
                    x[i * per + r] = q;
                    x[j * per + r] = p;
                }
            }
        }
        if (r < (unsigned)k) {
            float p = soft[i * k + r], q = soft[j * k + r];
            soft[i * k + r] = __fadd_rn(__fmul_rn(lam, p), __fmul_rn(rest, q));
            soft[j * k + r] = __fadd_rn(__fmul_rn(lam, q), __fmul_rn(rest, p));
        }
    }
}

// ---- Per-image steps on the device: every sample draws from its own sequential stream
// (augment.rs's device_sample_stream) the numbers augment.rs's apply_one draws for one image,
// and each thread recomputes its sample's numbers (a few draws) and writes one output element.

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ int seq_below(SeqRng* r, int n) {
    return u64_below(philox_u64(r->stream, r->step, r->purpose, r->j++), n);
}
// lo + (hi - lo) u, as Rng::uniform.
__device__ __forceinline__ double seq_uniform(SeqRng* r, double lo, double hi) {
    return __dadd_rn(lo, __dmul_rn(__dsub_rn(hi, lo), seq_f64(r)));
}
// augment.rs's bilinear: zero outside the plane, f32 weights.
__device__ float bilinear_at(const float* plane, int h, int w, double y, double x) {
    double y0 = floor(y), x0 = floor(x);
    float fy = (float)__dsub_rn(y, y0), fx = (float)__dsub_rn(x, x0);
    auto at = [&](double yy, double xx) -> float {
        if (yy < 0.0 || xx < 0.0 || yy >= (double)h || xx >= (double)w) return 0.0f;
        return plane[(long long)yy * w + (long long)xx];
    };
    float gx = __fsub_rn(1.0f, fx), gy = __fsub_rn(1.0f, fy);
    float top = __fadd_rn(__fmul_rn(at(y0, x0), gx), __fmul_rn(at(y0, x0 + 1.0), fx));
    float bottom = __fadd_rn(__fmul_rn(at(y0 + 1.0, x0), gx), __fmul_rn(at(y0 + 1.0, x0 + 1.0), fx));
    return __fadd_rn(__fmul_rn(top, gy), __fmul_rn(bottom, fy));
}

// kind: 0 crop / translate (p = the pixels), 1 flip (p = probability), 2 scale (p = smallest
// area), 3 rotate (p = degrees), 4 noise (p = std), 5 Cutout (p = side). dst = f(src); for
// noise and Cutout, which read only the element they write, src may be dst.
extern "C" __global__ void augment_samples(const float* src, float* dst, int kind, float p, int b,
                                           int c, int h, int w, u64 stream, const u32* step,
                                           u32 purpose) {
    u32 s = *step;
    unsigned hw = (unsigned)(h * w), per = (unsigned)c * hw;
    PLANE_LOOP(smp, r, b, per) {
        SeqRng rng = {mix64(stream ^ mix64((u64)smp + 1)), s, purpose, 0};
        unsigned ch = r / hw, rr = r - ch * hw;
        int y = (int)(rr / (unsigned)w), x = (int)(rr - (unsigned)y * w);
        const float* img = src + smp * per;
        const float* plane = img + (long long)ch * hw;
        float v = img[r];
        if (kind == 0) {
            int n = 2 * (int)p + 1;
            int dy = seq_below(&rng, n) - (int)p, dx = seq_below(&rng, n) - (int)p;
            int sy = y + dy, sx = x + dx;
            v = (sy >= 0 && sy < h && sx >= 0 && sx < w) ? plane[sy * w + sx] : 0.0f;
        } else if (kind == 1) {
            if ((float)seq_f64(&rng) < p) v = plane[y * w + (w - 1 - x)];
        } else if (kind == 2) {
            double area = seq_uniform(&rng, (double)p, 1.0);
            double ratio = exp(seq_uniform(&rng, log(3.0 / 4.0), log(4.0 / 3.0)));
            double bw = fmin(__dmul_rn(sqrt(__dmul_rn(area, ratio)), (double)w), (double)w);
            double bh = fmin(__dmul_rn(sqrt(__ddiv_rn(area, ratio)), (double)h), (double)h);
            double x0 = seq_uniform(&rng, 0.0, __dsub_rn((double)w, bw));
            double y0 = seq_uniform(&rng, 0.0, __dsub_rn((double)h, bh));
            double sy = __dsub_rn(__dadd_rn(y0, __ddiv_rn(__dmul_rn(y + 0.5, bh), (double)h)), 0.5);
            double sx = __dsub_rn(__dadd_rn(x0, __ddiv_rn(__dmul_rn(x + 0.5, bw), (double)w)), 0.5);
            sy = fmin(fmax(sy, 0.0), (double)h - 1.0);
            sx = fmin(fmax(sx, 0.0), (double)w - 1.0);
            v = bilinear_at(plane, h, w, sy, sx);
        } else if (kind == 3) {
            double angle = __dmul_rn(seq_uniform(&rng, -(double)p, (double)p),
                                     3.141592653589793 / 180.0);
            double cy = ((double)h - 1.0) / 2.0, cx = ((double)w - 1.0) / 2.0;
            double sn, co;
            sincos(angle, &sn, &co);
            double dy = __dsub_rn((double)y, cy), dx = __dsub_rn((double)x, cx);
            double sy = __dsub_rn(__dadd_rn(cy, __dmul_rn(co, dy)), __dmul_rn(sn, dx));
            double sx = __dadd_rn(__dadd_rn(cx, __dmul_rn(sn, dy)), __dmul_rn(co, dx));
            v = (sy < -0.5 || sx < -0.5 || sy > (double)h - 0.5 || sx > (double)w - 0.5)
                    ? 0.0f
                    : bilinear_at(plane, h, w, sy, sx);
        } else if (kind == 4) {
            rng.j = 2 * (u64)r;  // element r takes the draws 2r and 2r + 1, as in order
            v = __fadd_rn(v, __fmul_rn(p, (float)seq_normal(&rng)));
        } else if (kind == 5) {
            int cy = seq_below(&rng, h), cx = seq_below(&rng, w);
            int size = (int)p, half = size / 2;
            int y0 = max(cy - half, 0), y1 = min(cy - half + size, h);
            int x0 = max(cx - half, 0), x1 = min(cx - half + size, w);
            if (y >= y0 && y < y1 && x >= x0 && x < x1) v = 0.0f;
        }
        dst[smp * per + r] = v;
    }
}

extern "C" __global__ void one_hot(const u32* labels, float* out, long long b, int k) {
    GRID_STRIDE(i, b * k) out[i] = labels[i / k] == (u32)(i % k) ? 1.0f : 0.0f;
}
