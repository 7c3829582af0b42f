// Just enough of CUDA's execution model to run regimen's plain-C++ kernels on the CPU, for
// tests: a block's threads run as host threads, `__syncthreads` is a barrier among them,
// `__shared__` arrays are function statics (blocks run one after another, so each block has
// them to itself). Exact f32 arithmetic as on the GPU (no fast-math here or there).
#pragma once
#include <barrier>
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

static std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)

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
