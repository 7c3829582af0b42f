// Runs the batch-building kernels of kernels.cu on the CPU (see shim.h) for
// tests/kernels_emulated.rs, launched as backend/cuda/mod.rs launches them (the same grids:
// planes on y, 256-thread blocks along x; one thread for mix_params).
//
//   aug_emu DIR gather  n b c h w pad flip_p stream step purpose cursor
//       reads DIR/images.bin (f32 [n, c, h, w]), labels.bin, order.bin (u32 [n]);
//       writes x.out (f32 [b, c, h, w]) and labels.out (u32 [b])
//   aug_emu DIR samples kind p b c h w stream step purpose
//       reads x.bin (f32 [b, c, h, w]); writes x.out
//   aug_emu DIR mix     alpha cutmix b k c h w stream step purpose
//       reads x.bin and soft.bin (f32 [b, k]); writes x.out, soft.out and params.out
//   aug_emu DIR one_hot b k
//       reads labels.bin (u32 [b]); writes soft.out
//
// Files are raw little-endian 4-byte values; the f32 arguments (flip_p, p, alpha) are given as
// their bits, a decimal u32, so that they arrive exact.
#include <string>

#include "shim.h"
#include "kernels.cu"

// backend/cuda/mod.rs's launch_planes: x blocks over `inner`, one grid row per plane.
static dim3 planes_grid(long long planes, long long inner) {
    long long x = (inner + 255) / 256;
    x = x < 1 ? 1 : (x > 4096 ? 4096 : x);
    long long y = planes < 1 ? 1 : (planes > 65535 ? 65535 : planes);
    return dim3{(unsigned)x, (unsigned)y, 1};
}

static const char* USAGE =
    "usage: aug_emu DIR gather n b c h w pad flip_p stream step purpose cursor\n"
    "       aug_emu DIR samples kind p b c h w stream step purpose\n"
    "       aug_emu DIR mix alpha cutmix b k c h w stream step purpose\n"
    "       aug_emu DIR one_hot b k\n";

int main(int argc, char** argv) {
    if (argc < 3) {
        fputs(USAGE, stderr);
        return 2;
    }
    std::string dir = std::string(argv[1]) + "/", op = argv[2];
    auto arg = [&](int i) -> const char* {
        if (i + 3 >= argc) {
            fputs(USAGE, stderr);
            exit(2);
        }
        return argv[i + 3];
    };
    auto num = [&](int i) { return atoll(arg(i)); };
    auto u64arg = [&](int i) { return (u64)strtoull(arg(i), nullptr, 10); };
    auto f32arg = [&](int i) { return __uint_as_float((u32)strtoul(arg(i), nullptr, 10)); };
    if (op == "gather") {
        int n = num(0), b = num(1), c = num(2), h = num(3), w = num(4), pad = num(5);
        float flip_p = f32arg(6);
        u64 stream = u64arg(7);
        u32 step = (u32)num(8), purpose = (u32)num(9), cursor = (u32)num(10);
        long long per = (long long)c * h * w;
        auto images = emu_load<float>(dir + "images.bin", n * per);
        auto labels = emu_load<u32>(dir + "labels.bin", n);
        auto order = emu_load<u32>(dir + "order.bin", n);
        std::vector<float> x(b * per);
        std::vector<u32> labels_out(b);
        emu_launch(planes_grid(b, per), 256, [&] {
            gather_augment(images.data(), labels.data(), order.data(), &cursor, x.data(),
                           labels_out.data(), b, c, h, w, pad, flip_p, stream, &step, purpose);
        });
        emu_save(dir + "x.out", x);
        emu_save(dir + "labels.out", labels_out);
    } else if (op == "samples") {
        int kind = num(0);
        float p = f32arg(1);
        int b = num(2), c = num(3), h = num(4), w = num(5);
        u64 stream = u64arg(6);
        u32 step = (u32)num(7), purpose = (u32)num(8);
        long long per = (long long)c * h * w;
        auto x = emu_load<float>(dir + "x.bin", b * per);
        // Noise (4) and Cutout (5) in place; the others from a copy, as the backend does.
        std::vector<float> src = x;
        const float* from = kind >= 4 ? x.data() : src.data();
        emu_launch(planes_grid(b, per), 256, [&] {
            augment_samples(from, x.data(), kind, p, b, c, h, w, stream, &step, purpose);
        });
        emu_save(dir + "x.out", x);
    } else if (op == "mix") {
        float alpha = f32arg(0);
        int cutmix = num(1), b = num(2), k = num(3), c = num(4), h = num(5), w = num(6);
        u64 stream = u64arg(7);
        u32 step = (u32)num(8), purpose = (u32)num(9);
        long long per = (long long)c * h * w;
        auto x = emu_load<float>(dir + "x.bin", b * per);
        auto soft = emu_load<float>(dir + "soft.bin", (size_t)b * k);
        std::vector<float> params(5);
        emu_launch(dim3{1, 1, 1}, 1, [&] {
            mix_params(params.data(), alpha, cutmix, h, w, stream, &step, purpose);
        });
        if (b > 0)
            emu_launch(planes_grid((b + 1) / 2, per > k ? per : k), 256, [&] {
                mix_batch(x.data(), soft.data(), params.data(), b, k, h, w, (unsigned)per,
                          cutmix);
            });
        emu_save(dir + "x.out", x);
        emu_save(dir + "soft.out", soft);
        emu_save(dir + "params.out", params);
    } else if (op == "one_hot") {
        long long b = num(0);
        int k = num(1);
        auto labels = emu_load<u32>(dir + "labels.bin", b);
        std::vector<float> soft(b * k);
        long long blocks = (b * k + 255) / 256;
        emu_launch(dim3{(unsigned)(blocks < 1 ? 1 : blocks), 1, 1}, 256,
                   [&] { one_hot(labels.data(), soft.data(), b, k); });
        emu_save(dir + "soft.out", soft);
    } else {
        fputs(USAGE, stderr);
        return 2;
    }
    return 0;
}
