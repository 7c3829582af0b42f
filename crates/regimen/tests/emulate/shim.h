// Just enough of CUDA's execution model to run regimen's plain-C++ kernels on the CPU, for
// tests: a block's threads run as host threads, `__syncthreads` is a barrier among them,
// `__shared__` arrays are function statics (blocks run one after another, so each block has
// them to itself). f32 arithmetic without fast-math on both sides, but not bit-identical: the
// GPU fuses `acc += a * b` into FMAs and its tensor cores sum in their own order, which the
// tests' tolerances allow.
#pragma once
#include <math.h>

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};

static std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)

// The two PTX instructions of conv.cu (under __CUDACC__ there), with the semantics the PTX
// ISA documents.

// cvt.rna.tf32.f32: keep 10 mantissa bits, to nearest, ties away from zero; NaN and infinity
// stay as they are.
inline float ig_tf32(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return f;
    u = (u + 0x1000u) & 0xffffe000u;
    std::memcpy(&f, &u, 4);
    return f;
}

// Eight mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 of one warp (see conv.cu's
// ig_mma_2x4): every lane publishes its fragments, then computes its own four results of each
// product from all lanes' fragments. Lane 4 g + t holds A(g, t), A(g + 8, t), A(g, t + 4),
// A(g + 8, t + 4); B(t, g), B(t + 4, g); and D(g, 2 t), D(g, 2 t + 1), D(g + 8, 2 t),
// D(g + 8, 2 t + 1). Called by all threads of the block together (like the hardware's
// warp-wide instruction, which needs all 32 lanes).
inline void ig_mma_2x4(float acc[32], const float a[2][4], const float b[4][2]) {
    static float fa[8][32][2][4], fb[8][32][4][2];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    std::memcpy(fa[warp][lane], a, sizeof(fa[0][0]));
    std::memcpy(fb[warp][lane], b, sizeof(fb[0][0]));
    __syncthreads();
    for (int mi = 0; mi < 2; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int q = 0; q < 4; q++) {
                const int row = g + (q / 2) * 8, col = 2 * t + q % 2;
                float d = acc[(mi * 4 + ni) * 4 + q];
                for (int k = 0; k < 8; k++) {
                    float av = fa[warp][(row % 8) * 4 + k % 4][mi][(row / 8) + 2 * (k / 4)];
                    float bv = fb[warp][col * 4 + k % 4][ni][k / 4];
                    d += av * bv;
                }
                acc[(mi * 4 + ni) * 4 + q] = d;
            }
    __syncthreads();
}

// Run `kernel()` on every thread of every block of `grid`, blocks one at a time.
template <class F>
void emu_launch(dim3 grid, unsigned threads, F kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> bar((std::ptrdiff_t)threads);
                emu_barrier = &bar;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([=] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        kernel();
                    });
                for (auto& th : ts) th.join();
            }
}

// ---- kernels.cu's intrinsics (the batch-building kernels that tests/kernels_emulated.rs runs,
// and what the rest of the file needs to compile). Built with -ffp-contract=off, so that each
// `_rn` operation is one IEEE operation, rounded to nearest, as on the GPU.

inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// Warp shuffles and atomics are not emulated: the kernels that use them (warp reductions) are
// held to the CPU on a GPU only (tests/conformance.rs). Reaching one here is a test error.
template <class T>
T __shfl_xor_sync(unsigned, T, int) {
    fprintf(stderr, "__shfl_xor_sync is not emulated\n");
    abort();
}
template <class T>
T atomicAdd(T*, T) {
    fprintf(stderr, "atomicAdd is not emulated\n");
    abort();
}

// cvt.rn.bf16.f32: to nearest even; a NaN stays a (quiet) NaN.
inline unsigned short f32_to_bf16(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
// cvt.rn.f16.f32 and cvt.f32.f16, through the compiler's IEEE half type.
inline unsigned short f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short r;
    std::memcpy(&r, &h, 2);
    return r;
}
inline float f16_to_f32(unsigned short b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
}

// ---- The drivers' files: raw little-endian 4-byte values (f32 or u32).

template <class T = float>
std::vector<T> emu_load(const std::string& path, size_t n) {
    std::vector<T> v(n);
    FILE* f = fopen(path.c_str(), "rb");
    if (!f || fread(v.data(), 4, n, f) != n) {
        fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
        exit(2);
    }
    fclose(f);
    return v;
}

template <class T>
void emu_save(const std::string& path, const std::vector<T>& v) {
    FILE* f = fopen(path.c_str(), "wb");
    if (!f || fwrite(v.data(), 4, v.size(), f) != v.size()) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        exit(2);
    }
    fclose(f);
}
