// Runs the implicit-GEMM convolution kernels of conv.cu on the CPU (see shim.h) for
// tests/conv_emulated.rs.
//
//   conv_emu DIR nb c h w oc kh kw stride pad chunk bias tf32 bm bk
//
// with bm 64 (tiles of 64 x 128) or 32 (32 x 256, the `_m32` kernels), bk 8 or 32 (the `_k32`
// kernels)
//
// reads DIR/x.bin, w.bin, dy.bin, dw.bin (the gradient to add to) and, with bias = 1, b.bin
// (raw little-endian f32); writes DIR/y.out, dx.out, dw.out.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "shim.h"
#include "conv.cu"

static unsigned ceil_div(long long a, long long b) { return (unsigned)((a + b - 1) / b); }

int main(int argc, char** argv) {
    if (argc != 16) {
        fprintf(stderr, "usage: conv_emu DIR nb c h w oc kh kw stride pad chunk bias tf32 bm bk\n");
        return 2;
    }
    std::string dir = argv[1];
    IgShape s;
    s.nb = atoi(argv[2]);
    s.c = atoi(argv[3]);
    s.h = atoi(argv[4]);
    s.w = atoi(argv[5]);
    s.oc = atoi(argv[6]);
    s.kh = atoi(argv[7]);
    s.kw = atoi(argv[8]);
    s.stride = atoi(argv[9]);
    s.pad = atoi(argv[10]);
    int chunk = atoi(argv[11]);
    bool has_bias = atoi(argv[12]) != 0;
    bool tf32 = atoi(argv[13]) != 0;
    const int BM = atoi(argv[14]), BN = IG_TILE / BM, BK = atoi(argv[15]);
    if ((BM != 64 && BM != 32) || (BK != 8 && BK != 32)) {
        fprintf(stderr, "bm must be 64 or 32, bk 8 or 32\n");
        return 2;
    }
    // The kernel of each kind for this arithmetic, tile and step, as the backend names it.
    using Fwd = decltype(&conv_ig_fwd_f32);
    using Dx = decltype(&conv_ig_dx_f32);
    using Dw = decltype(&conv_ig_dw_f32);
    const int v = (int)tf32 + 2 * (BM == 32) + 4 * (BK == 32);
    const Fwd fwds[8] = {conv_ig_fwd_f32,         conv_ig_fwd_tf32,       conv_ig_fwd_f32_m32,
                         conv_ig_fwd_tf32_m32,    conv_ig_fwd_f32_k32,    conv_ig_fwd_tf32_k32,
                         conv_ig_fwd_f32_m32_k32, conv_ig_fwd_tf32_m32_k32};
    const Dx dxs[8] = {conv_ig_dx_f32,         conv_ig_dx_tf32,       conv_ig_dx_f32_m32,
                       conv_ig_dx_tf32_m32,    conv_ig_dx_f32_k32,    conv_ig_dx_tf32_k32,
                       conv_ig_dx_f32_m32_k32, conv_ig_dx_tf32_m32_k32};
    const Dw dws[8] = {conv_ig_dw_f32,         conv_ig_dw_tf32,       conv_ig_dw_f32_m32,
                       conv_ig_dw_tf32_m32,    conv_ig_dw_f32_k32,    conv_ig_dw_tf32_k32,
                       conv_ig_dw_f32_m32_k32, conv_ig_dw_tf32_m32_k32};
    const Fwd fwd = fwds[v];
    const Dx dxk = dxs[v];
    const Dw dwk = dws[v];
    s.oh = (s.h + 2 * s.pad - s.kh) / s.stride + 1;
    s.ow = (s.w + 2 * s.pad - s.kw) / s.stride + 1;
    long long P = (long long)s.oh * s.ow, K = (long long)s.c * s.kh * s.kw;
    long long nx = (long long)s.nb * s.c * s.h * s.w, ny = (long long)s.nb * s.oc * P,
              nw = (long long)s.oc * K;
    auto x = emu_load(dir + "/x.bin", nx), w = emu_load(dir + "/w.bin", nw), dy = emu_load(dir + "/dy.bin", ny),
         dw = emu_load(dir + "/dw.bin", nw);
    std::vector<float> b = has_bias ? emu_load(dir + "/b.bin", s.oc) : std::vector<float>();
    std::vector<float> y(ny, -1.0f), dx(nx, -1.0f);
    const float* bp = has_bias ? b.data() : nullptr;

    // The window tables, as the backend makes them (padded to a multiple of IG_KPAD entries).
    auto table = [&](int dx) {
        long long k = dx ? (long long)s.oc * s.kh * s.kw : K;
        int n = (int)((k + IG_KPAD - 1) / IG_KPAD * IG_KPAD);
        std::vector<int4> t(n, int4{-1, -1, -1, -1});
        emu_launch({ceil_div(n, 256), 1, 1}, 256, [&] { conv_ig_ktab(s, t.data(), dx, n); });
        return t;
    };
    auto tab_fwd = table(0), tab_dx = table(1);
    emu_launch({ceil_div(s.nb * P, BN), ceil_div(s.oc, BM), 1}, IG_THREADS,
               [&] { fwd(x.data(), w.data(), bp, y.data(), tab_fwd.data(), s); });
    emu_launch({ceil_div((long long)s.nb * s.h * s.w, BN), ceil_div(s.c, BM), 1}, IG_THREADS,
               [&] { dxk(dy.data(), w.data(), dx.data(), tab_dx.data(), s); });
    unsigned chunks = ceil_div(s.nb * P, chunk);
    std::vector<float> part((size_t)chunks * nw, -1.0f);
    emu_launch({ceil_div(K, BN), ceil_div(s.oc, BM), chunks}, IG_THREADS,
               [&] { dwk(x.data(), dy.data(), part.data(), s, chunk); });
    emu_launch({ceil_div(nw, 32), 1, 1}, 256,
               [&] { conv_ig_dw_sum(part.data(), dw.data(), (int)chunks, nw); });
    emu_save(dir + "/y.out", y);
    emu_save(dir + "/dx.out", dx);
    emu_save(dir + "/dw.out", dw);
    printf("%u chunks\n", chunks);
    return 0;
}
