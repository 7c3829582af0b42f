// Runs kernels of kernels.cu on the CPU (see shim.h) for tests/kernels_emulated.rs: the
// batch-building ones and batch norm's, launched as backend/cuda/mod.rs launches them (the same
// grids: planes on y, 256-thread blocks along x; one thread for mix_params; a block per
// channel and split for batch norm's sums).
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
//   aug_emu DIR bn      nb c h w after splits eps momentum half
//       batch norm with batch statistics over x.bin (f32 [nb, c, h w]) then `after` (0
//       nothing, 1 a ReLU, 2 a ReLU and a 2x2 max pool), forward (gamma.bin, beta.bin, rm.bin,
//       rv.bin: f32 [c]) and backward (dy.bin, the output's gradient; mean.bin, invstd.bin:
//       the statistics the backward is given; dgamma.bin, dbeta.bin: the gradients to add to),
//       and the evaluation pass with eval_mean.bin, eval_invstd.bin (with half = 1, x rounded
//       to bf16 and the bf16 kernels, y and ye written back as f32); writes y.out, mean.out,
//       invstd.out, rm.out, rv.out, dx.out, dgamma.out, dbeta.out, ye.out
//   aug_emu DIR philox  n p stream step purpose
//       dropout_fwd of x.bin (f32 [n]) with drop probability p, uniform_fill and
//       bernoulli_keep of n draws; writes y.out, mask.out, uniform.out, keep.out, and the
//       dropout of x rounded to bf16 (dropout_fwd_h): yh.out (as f32), maskh.out
//   aug_emu DIR bias    rows c
//       a linear layer's bias: y.bin (f32 [rows, c]) += b.bin (f32 [c]); db.bin (f32 [c]) +=
//       the column sums of dy.bin (f32 [rows, c]); writes y.out and db.out; the fused
//       bias + ReLU (+ dropout) passes and their backward (yr, yn, dz, dbr, yd, dzd, dbd,
//       ydn, dzdn .out), that backward from the dropout's output rounded to bf16 (dzh,
//       dbh .out)
//
// Files are raw little-endian 4-byte values; the f32 arguments (flip_p, p, alpha) are given as
// their bits, a decimal u32, so that they arrive exact.
#include <string>

#include "shim.h"
#include "kernels.cu"

// backend/cuda/mod.rs's launch_planes: blocks of the plane's length rounded up to whole warps
// (at most 256 threads), x blocks over `inner`, one grid row per plane.
template <class F>
static void launch_planes(long long planes, long long inner, F kernel) {
    long long block = (inner + 31) / 32 * 32;
    block = block < 32 ? 32 : (block > 256 ? 256 : block);
    long long x = (inner + block - 1) / block;
    x = x < 1 ? 1 : (x > 4096 ? 4096 : x);
    long long y = planes < 1 ? 1 : (planes > 65535 ? 65535 : planes);
    emu_launch(dim3{(unsigned)x, (unsigned)y, 1}, (unsigned)block, kernel);
}

static const char* USAGE =
    "usage: aug_emu DIR gather n b c h w pad flip_p stream step purpose cursor\n"
    "       aug_emu DIR samples kind p b c h w stream step purpose\n"
    "       aug_emu DIR mix alpha cutmix b k c h w stream step purpose\n"
    "       aug_emu DIR one_hot b k\n"
    "       aug_emu DIR bn nb c h w after splits eps momentum\n"
    "       aug_emu DIR philox n p stream step purpose\n"
    "       aug_emu DIR bias rows c\n";

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
        launch_planes(b, per, [&] {
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
        launch_planes(b, per, [&] {
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
            launch_planes((b + 1) / 2, per > k ? per : k, [&] {
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
    } else if (op == "bn") {
        int nb = num(0), c = num(1), h = num(2), w = num(3), after = num(4), splits = num(5);
        // Features ([N, C], inner 1) take the row kernels, in 8 splits, as the backend does.
        const bool rows = (long long)h * w == 1 && after != 2;
        if (rows) splits = 8;
        float eps = f32arg(6), momentum = f32arg(7);
        const bool half = num(8) != 0;
        long long inner = (long long)h * w, planes = (long long)nb * c, n = planes * inner;
        int oh = h / 2, ow = w / 2;
        long long ny = after == 2 ? planes * oh * ow : n;
        auto x = emu_load<float>(dir + "x.bin", n);
        // The bf16 kernels' x (x rounded), y and ye.
        std::vector<u16> xh(n), yh(ny), yeh(n);
        for (long long i = 0; i < n; i++) xh[i] = f32_to_bf16(x[i]);
        auto dy = emu_load<float>(dir + "dy.bin", ny);
        auto gamma = emu_load<float>(dir + "gamma.bin", c), beta = emu_load<float>(dir + "beta.bin", c);
        auto rm = emu_load<float>(dir + "rm.bin", c), rv = emu_load<float>(dir + "rv.bin", c);
        auto mean_in = emu_load<float>(dir + "mean.bin", c);
        auto invstd_in = emu_load<float>(dir + "invstd.bin", c);
        auto dgamma = emu_load<float>(dir + "dgamma.bin", c);
        auto dbeta = emu_load<float>(dir + "dbeta.bin", c);
        auto eval_mean = emu_load<float>(dir + "eval_mean.bin", c);
        auto eval_invstd = emu_load<float>(dir + "eval_invstd.bin", c);
        const dim3 sums{(unsigned)c, (unsigned)splits, 1}, per_channel{(unsigned)(c + 255) / 256, 1, 1};
        // Forward: statistics, then the normalization pass of `after`.
        std::vector<double> part(3 * c * splits);
        const dim3 row_sums{(unsigned)(c + 31) / 32, 1, 1};
        if (rows)
            emu_launch(row_sums, 256, [&] {
                if (half) bn_row_stats_partial_h(xh.data(), nb, c, part.data());
                else bn_row_stats_partial(x.data(), nb, c, part.data());
            });
        else
            emu_launch(sums, 256, [&] {
                if (half) bn_stats_partial_h(xh.data(), nb, c, inner, splits, part.data());
                else bn_stats_partial(x.data(), nb, c, inner, splits, part.data());
            });
        std::vector<float> mean(c), invstd(c), scale(c), shift(c), y(ny);
        emu_launch(per_channel, 256, [&] {
            bn_stats_finish(part.data(), c, splits, eps, momentum, gamma.data(), beta.data(),
                            mean.data(), invstd.data(), scale.data(), shift.data(), rm.data(),
                            rv.data());
        });
        const float *sc = scale.data(), *sh = shift.data();
        if (rows)
            launch_planes(nb, c, [&] {
                if (half) bn_row_apply_h(xh.data(), sc, sh, yh.data(), nb, c, after);
                else bn_row_apply(x.data(), sc, sh, y.data(), nb, c, after);
            });
        else if (after == 2)
            launch_planes(planes, (long long)oh * ow, [&] {
                if (half) bn_relu_pool_apply_h(xh.data(), sc, sh, yh.data(), planes, c, h, w);
                else bn_relu_pool_apply(x.data(), sc, sh, y.data(), planes, c, h, w);
            });
        else
            launch_planes(planes, inner, [&] {
                if (half)
                    (after ? bn_relu_apply_h : bn_apply_h)(xh.data(), sc, sh, yh.data(), planes, c,
                                                           inner);
                else
                    (after ? bn_relu_apply : bn_apply)(x.data(), sc, sh, y.data(), planes, c,
                                                       inner);
            });
        if (half)
            for (long long i = 0; i < ny; i++) y[i] = bf16_to_f32(yh[i]);
        // Backward with the given statistics.
        std::vector<double> bpart(2 * c * splits);
        const float *g = gamma.data(), *be = beta.data(), *mi = mean_in.data(),
                    *is = invstd_in.data();
        emu_launch(rows ? row_sums : sums, 256, [&] {
            if (rows && half)
                bn_row_bwd_partial_h(xh.data(), dy.data(), g, be, mi, is, nb, c, after,
                                     bpart.data());
            else if (rows)
                bn_row_bwd_partial(x.data(), dy.data(), g, be, mi, is, nb, c, after, bpart.data());
            else if (half)
                bn_after_bwd_partial_h(xh.data(), dy.data(), g, be, mi, is, nb, c, h, w, after,
                                       splits, bpart.data());
            else
                bn_after_bwd_partial(x.data(), dy.data(), g, be, mi, is, nb, c, h, w, after,
                                     splits, bpart.data());
        });
        std::vector<float> mean_dy(c), mean_dyx(c), dx(n);
        emu_launch(per_channel, 256, [&] {
            bn_bwd_finish(bpart.data(), c, splits, (double)nb * inner, dgamma.data(), dbeta.data(),
                          mean_dy.data(), mean_dyx.data());
        });
        const float *md = mean_dy.data(), *mdx = mean_dyx.data();
        if (rows)
            launch_planes(nb, c, [&] {
                if (half)
                    bn_row_bwd_dx_h(xh.data(), dy.data(), g, be, mi, is, md, mdx, 1, after,
                                    dx.data(), nb, c);
                else
                    bn_row_bwd_dx(x.data(), dy.data(), g, be, mi, is, md, mdx, 1, after, dx.data(),
                                  nb, c);
            });
        else
            launch_planes(planes, inner, [&] {
                if (after && half)
                    bn_after_bwd_dx_h(xh.data(), dy.data(), g, be, mi, is, md, mdx, dx.data(),
                                      planes, c, h, w, after);
                else if (after)
                    bn_after_bwd_dx(x.data(), dy.data(), g, be, mi, is, md, mdx, dx.data(), planes,
                                    c, h, w, after);
                else if (half)
                    bn_bwd_dx_h(xh.data(), dy.data(), g, mi, is, md, mdx, 1, dx.data(), planes, c,
                                inner);
                else
                    bn_bwd_dx(x.data(), dy.data(), g, mi, is, md, mdx, 1, dx.data(), planes, c,
                              inner);
            });
        emu_save(dir + "y.out", y);
        emu_save(dir + "mean.out", mean);
        emu_save(dir + "invstd.out", invstd);
        emu_save(dir + "rm.out", rm);
        emu_save(dir + "rv.out", rv);
        emu_save(dir + "dx.out", dx);
        emu_save(dir + "dgamma.out", dgamma);
        emu_save(dir + "dbeta.out", dbeta);
        // Evaluation, with the backend's grid (rows for features, planes otherwise).
        std::vector<float> ye(n);
        const float *em = eval_mean.data(), *ei = eval_invstd.data();
        if (inner == 1)
            launch_planes(nb, c, [&] {
                if (half) bn_row_eval_h(xh.data(), g, be, em, ei, yeh.data(), nb, c);
                else bn_row_eval(x.data(), g, be, em, ei, ye.data(), nb, c);
            });
        else
            launch_planes(planes, inner, [&] {
                if (half) bn_eval_h(xh.data(), g, be, em, ei, yeh.data(), planes, c, inner);
                else bn_eval(x.data(), g, be, em, ei, ye.data(), planes, c, inner);
            });
        if (half)
            for (long long i = 0; i < n; i++) ye[i] = bf16_to_f32(yeh[i]);
        emu_save(dir + "ye.out", ye);
    } else if (op == "philox") {
        long long n = num(0);
        float p = f32arg(1);
        u64 stream = u64arg(2);
        u32 step = (u32)num(3), purpose = (u32)num(4);
        auto x = emu_load<float>(dir + "x.bin", n);
        std::vector<float> y(n), mask(n), uni(n), keep(n);
        // backend/cuda/mod.rs's blocks_for over the n / 4 Philox blocks.
        long long blocks = ((n + 3) / 4 + 255) / 256;
        const dim3 grid{(unsigned)(blocks < 1 ? 1 : blocks), 1, 1};
        emu_launch(grid, 256, [&] {
            dropout_fwd(x.data(), y.data(), mask.data(), n, p, stream, &step, purpose);
        });
        emu_launch(grid, 256, [&] { uniform_fill(uni.data(), n, stream, &step, purpose + 1); });
        emu_launch(grid, 256,
                   [&] { bernoulli_keep(keep.data(), n, p, stream, &step, purpose + 2); });
        // dropout_fwd_h: x rounded to bf16, y in bf16 (written back as f32).
        std::vector<u16> xh(n), yh(n);
        for (long long i = 0; i < n; i++) xh[i] = f32_to_bf16(x[i]);
        std::vector<float> yhf(n), maskh(n);
        emu_launch(grid, 256, [&] {
            dropout_fwd_h(xh.data(), yh.data(), maskh.data(), n, p, stream, &step, purpose);
        });
        for (long long i = 0; i < n; i++) yhf[i] = bf16_to_f32(yh[i]);
        emu_save(dir + "yh.out", yhf);
        emu_save(dir + "maskh.out", maskh);
        emu_save(dir + "y.out", y);
        emu_save(dir + "mask.out", mask);
        emu_save(dir + "uniform.out", uni);
        emu_save(dir + "keep.out", keep);
    } else if (op == "bias") {
        long long rows = num(0);
        int c = num(1);
        auto y = emu_load<float>(dir + "y.bin", rows * c), dy = emu_load<float>(dir + "dy.bin", rows * c);
        auto b = emu_load<float>(dir + "b.bin", c), db = emu_load<float>(dir + "db.bin", c);
        // The fused pair (a linear layer followed by a ReLU) from the same inputs.
        auto yr = y, yn = y, yd = y, ydn = y, dbr = db, dbd = db;
        std::vector<float> dz(y.size()), dzd(y.size()), dzdn(y.size());
        // The fused dropout: p 0.25, stream 77, step 3, purpose 1 (the Rust side's).
        const float p = 0.25f, keep = 1.0f / (1.0f - p);
        const u32 step = 3;
        long long n = rows * c, blocks = ((n + 3) / 4 + 255) / 256;
        launch_planes(rows, c, [&] { add_row_bias(y.data(), b.data(), rows, c); });
        emu_launch(dim3{(unsigned)(c + 31) / 32, 1, 1}, 1024,
                   [&] { row_sum_acc(dy.data(), db.data(), (int)rows, c); });
        launch_planes(rows, c, [&] { add_row_bias_relu(yr.data(), b.data(), rows, c); });
        launch_planes(rows, c, [&] { add_row_bias_relu(yn.data(), nullptr, rows, c); });
        emu_launch(dim3{(unsigned)(c + 31) / 32, 1, 1}, 1024, [&] {
            relu_row_sum_acc(yr.data(), 0, dy.data(), dz.data(), dbr.data(), (int)rows, c, 1.0f);
        });
        emu_launch(dim3{(unsigned)blocks, 1, 1}, 256, [&] {
            add_row_bias_relu_dropout(yd.data(), b.data(), n, c, p, 77, &step, 1);
        });
        emu_launch(dim3{(unsigned)(c + 31) / 32, 1, 1}, 1024, [&] {
            relu_row_sum_acc(yd.data(), 0, dy.data(), dzd.data(), dbd.data(), (int)rows, c, keep);
        });
        // Without a bias: neither added forward nor summed backward.
        emu_launch(dim3{(unsigned)blocks, 1, 1}, 256, [&] {
            add_row_bias_relu_dropout(ydn.data(), nullptr, n, c, p, 77, &step, 1);
        });
        emu_launch(dim3{(unsigned)(c + 31) / 32, 1, 1}, 1024, [&] {
            relu_row_sum_acc(ydn.data(), 0, dy.data(), dzdn.data(), nullptr, (int)rows, c, keep);
        });
        // The backward from the dropout's output kept in bf16 (bf16 activations).
        std::vector<u16> ydh(y.size());
        for (size_t i = 0; i < ydh.size(); i++) ydh[i] = f32_to_bf16(yd[i]);
        std::vector<float> dzh(y.size());
        auto dbh = emu_load<float>(dir + "db.bin", c);
        emu_launch(dim3{(unsigned)(c + 31) / 32, 1, 1}, 1024, [&] {
            relu_row_sum_acc(ydh.data(), 1, dy.data(), dzh.data(), dbh.data(), (int)rows, c, keep);
        });
        emu_save(dir + "dzh.out", dzh);
        emu_save(dir + "dbh.out", dbh);
        emu_save(dir + "y.out", y);
        emu_save(dir + "db.out", db);
        emu_save(dir + "yr.out", yr);
        emu_save(dir + "yn.out", yn);
        emu_save(dir + "dz.out", dz);
        emu_save(dir + "dbr.out", dbr);
        emu_save(dir + "yd.out", yd);
        emu_save(dir + "dzd.out", dzd);
        emu_save(dir + "dbd.out", dbd);
        emu_save(dir + "ydn.out", ydn);
        emu_save(dir + "dzdn.out", dzdn);
    } else {
        fputs(USAGE, stderr);
        return 2;
    }
    return 0;
}
