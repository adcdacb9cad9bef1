// SSD (Mamba-2) benchmark: per shape (batch, length, heads, head dim, groups, d_state) of the
// Mamba-2 issue, chunk 256, bf16 x/B/C, f32 dt with dt bias + softplus, D per head, no initial
// state: the forward and forward+backward times (median of 20 after 3 warm-ups, CUDA events),
// tokens/s, achieved TFLOP/s and GB/s, against the device's ceilings (H100: bf16 GEMM through
// cuBLAS 758 TFLOP/s, copy 2.97 TB/s; ../shared/DEVICE.md) and mamba_ssm's times from the issue.
// On sm_90 the forward and most of the backward are the fused kernels (ssd_*_hopper.cu), which
// also run fewer products (their intra-chunk products cover one 64-token tile); fwd_chunked_ms is
// the sm_80 chunked forward on the same GPU. TFLOP/s counts the chunked algorithm's products at
// Q = 256 on every path (a fixed measure of the work): per chunk of Q tokens and head (the tile
// products counted over their causal half, Q^2 / 2 pairs x 2), and per chunk and group for the
// head-independent score tiles C B^T:
//   forward  per head 4 Q P N + Q^2 P (chunk state, state term, weighted scores x x); per group
//            Q^2 N
//   backward per head 8 Q P N + 3 Q^2 P + 2 Q^2 N (state gradient, dx, dB, dC); per group Q^2 N
//            (the backward given the forward's y - D x; recomputing dy.(y - Dx) adds a forward
//            scan)
// Bytes: each input read and each output written once (the memory floor; the chunk states'
// traffic comes on top).
// Usage: bench_ssd [--out results.json]
#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "layers/ssd/ssd.h"

namespace {

using namespace braid;
using bench::DeviceTensors;
using bench::median_ms;

struct Shape {
  int64_t b, t, h, p, g, n;
};

}  // namespace

int main(int argc, char** argv) {
  const std::string out = bench::out_path(argc, argv);
  auto gpu = make_cuda_backend(0);
  const double mma_ceiling = 758e12, mem_ceiling = 2.97e12;
  const int64_t q = 256;
  const std::vector<Shape> shapes = {{8, 2048, 64, 64, 1, 128},
                                     {4, 4096, 64, 64, 1, 128},
                                     {2, 8192, 64, 64, 1, 128},
                                     {4, 4096, 80, 64, 8, 128}};
  // mamba_ssm 2.3.2 mamba_chunk_scan_combined (issue 4, H100, 2026-11-22): fwd, fwd+bwd ms.
  const double peer[][2] = {{0.604, 4.23}, {1.031, 3.73}, {0.956, 4.25}, {0.835, 4.37}};
  std::string json = "[";
  std::printf("%-26s %8s %7s %7s %9s %7s %7s %9s %9s\n", "B, T, H, P, G, N", "fwd ms", "TFLOP/s",
              "GB/s", "f+b ms", "TFLOP/s", "Mtok/s", "fwd/peer", "f+b/peer");
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape& s = shapes[si];
    DeviceTensors mem(*gpu);
    using K = RandomSpec::Kind;
    auto alloc = [&](std::vector<int64_t> shape, DType t, const char* name, RandomSpec spec) {
      return mem.random(std::move(shape), t, name, spec);
    };
    const std::vector<int64_t> bthp{s.b, s.t, s.h, s.p}, btgn{s.b, s.t, s.g, s.n};
    const Tensor x = alloc(bthp, DType::bf16, "x", {K::normal, 1, 1, 0, 1});
    const Tensor dt = alloc({s.b, s.t, s.h}, DType::f32, "dt", {K::uniform, 1, 2, -4, -1});
    const Tensor Bm = alloc(btgn, DType::bf16, "B", {K::normal, 1, 3, 0, 1});
    const Tensor Cm = alloc(btgn, DType::bf16, "C", {K::normal, 1, 4, 0, 1});
    const Tensor A = alloc({s.h}, DType::f32, "A", {K::uniform, 1, 5, -8, -1});
    const Tensor D = alloc({s.h}, DType::f32, "D", {K::normal, 1, 6, 0, 1});
    const Tensor bias = alloc({s.h}, DType::f32, "bias", {K::uniform, 1, 7, -1, 0});
    const Tensor y = alloc(bthp, DType::bf16, "y", {K::normal, 1, 8, 0, 1});
    const Tensor y_scan = alloc(bthp, DType::bf16, "y_scan", {K::normal, 1, 18, 0, 1});
    const Tensor dy = alloc(bthp, DType::bf16, "dy", {K::normal, 1, 9, 0, 1});
    const Tensor dx = alloc(bthp, DType::bf16, "dx", {K::normal, 1, 10, 0, 1});
    const Tensor ddt = alloc({s.b, s.t, s.h}, DType::f32, "ddt", {K::normal, 1, 11, 0, 1});
    const Tensor dB = alloc(btgn, DType::bf16, "dB", {K::normal, 1, 12, 0, 1});
    const Tensor dC = alloc(btgn, DType::bf16, "dC", {K::normal, 1, 13, 0, 1});
    const Tensor dA = alloc({s.h}, DType::f32, "dA", {K::normal, 1, 14, 0, 1});
    const Tensor dD = alloc({s.h}, DType::f32, "dD", {K::normal, 1, 15, 0, 1});
    const Tensor dbias = alloc({s.h}, DType::f32, "dbias", {K::normal, 1, 16, 0, 1});
    SsdInputs in;
    in.x = &x, in.dt = &dt, in.A = &A, in.B = &Bm, in.C = &Cm, in.D = &D, in.dt_bias = &bias;
    in.chunk = q;
    const Tensor ws =
        alloc({ssd_forward_workspace_elems(in)}, DType::f32, "workspace", {K::normal, 1, 17, 0, 1});
    const Tensor scratch =
        alloc({ssd_scratch_elems(in)}, DType::f32, "scratch", {K::normal, 1, 19, 0, 1});
    in.scratch = &scratch;  // as the mixer's, planned (not from the stream-ordered pool)
    const SsdGrads gr{&dx, &ddt, &dA, &dB, &dC, &dD, &dbias, nullptr};
    // As in training: the forward also writes y - D x, from which the backward reads
    // dy . (y - D x); and the backward recomputing that instead. "fwd" is the plain forward.
    SsdInputs with_scan = in;
    with_scan.y_scan = &y_scan;
    const double fwd = median_ms([&] { ssd_forward(in, y, nullptr, ws); });
    SsdInputs chunked = in;  // the sm_80 kernels (on sm_90 the fused forward is the default)
    chunked.hopper = false;
    const double fwd_chunked = median_ms([&] { ssd_forward(chunked, y, nullptr, ws); });
    const double bwd = median_ms([&] { ssd_backward(with_scan, dy, nullptr, gr, ws); });
    const double bwd_recompute = median_ms([&] { ssd_backward(in, dy, nullptr, gr, ws); });
    const double both = median_ms([&] {
      ssd_forward(with_scan, y, nullptr, ws);
      ssd_backward(with_scan, dy, nullptr, gr, ws);
    });
    const double chunks = double(s.b) * ((s.t + q - 1) / q);
    const double qpn = double(q) * s.p * s.n, qqp = double(q) * q * s.p, qqn = double(q) * q * s.n;
    const double fwd_flops = chunks * (s.h * (4 * qpn + qqp) + s.g * qqn);
    const double bwd_flops = chunks * (s.h * (8 * qpn + 3 * qqp + 2 * qqn) + s.g * qqn);
    const double act = double(s.b * s.t * s.h * s.p), bc = double(s.b * s.t * s.g * s.n),
                 lane = double(s.b * s.t * s.h);
    const double fwd_bytes = 2 * (2 * act + 2 * bc) + 4 * lane;
    auto tflops = [](double f, double ms) { return f / (ms * 1e-3) / 1e12; };
    char label[64];
    std::snprintf(label, sizeof(label), "%lld, %lld, %lld, %lld, %lld, %lld", (long long)s.b,
                  (long long)s.t, (long long)s.h, (long long)s.p, (long long)s.g, (long long)s.n);
    std::printf("%-26s %8.4f %7.1f %7.1f %9.4f %7.1f %7.1f %9.3f %9.3f\n", label, fwd,
                tflops(fwd_flops, fwd), fwd_bytes / (fwd * 1e-3) / 1e9, both,
                tflops(fwd_flops + bwd_flops, both), double(s.b * s.t) / (both * 1e-3) / 1e6,
                fwd / peer[si][0], both / peer[si][1]);
    char row[1024];
    std::snprintf(
        row, sizeof(row),
        "%s{\"batch\": %lld, \"length\": %lld, \"heads\": %lld, \"head_dim\": %lld, "
        "\"groups\": %lld, \"d_state\": %lld, \"chunk\": %lld, \"fwd_ms\": %.5f, "
        "\"fwd_chunked_ms\": %.5f, "
        "\"bwd_ms\": %.5f, \"bwd_recompute_ms\": %.5f, \"fwd_bwd_ms\": %.5f, \"fwd_tflops\": %.1f, "
        "\"fwd_bwd_tflops\": %.1f, \"fwd_pct_of_gemm_ceiling\": %.1f, "
        "\"fwd_gb_per_s\": %.1f, \"fwd_pct_of_copy_ceiling\": %.1f, "
        "\"fwd_bwd_tokens_per_s\": %.0f, \"peer_fwd_ms\": %.3f, "
        "\"peer_fwd_bwd_ms\": %.3f, \"fwd_vs_peer\": %.3f, \"fwd_bwd_vs_peer\": %.3f}",
        si ? ", " : "", (long long)s.b, (long long)s.t, (long long)s.h, (long long)s.p,
        (long long)s.g, (long long)s.n, (long long)q, fwd, fwd_chunked, bwd, bwd_recompute, both,
        tflops(fwd_flops, fwd), tflops(fwd_flops + bwd_flops, both),
        100 * tflops(fwd_flops, fwd) * 1e12 / mma_ceiling, fwd_bytes / (fwd * 1e-3) / 1e9,
        100 * fwd_bytes / (fwd * 1e-3) / mem_ceiling, double(s.b * s.t) / (both * 1e-3),
        peer[si][0], peer[si][1], fwd / peer[si][0], both / peer[si][1]);
    json += row;
  }
  // The gated RMSNorm that follows SSD in the mixer, at the first shape's size (M = B T rows,
  // width H P, 8 groups): bytes moved against the copy ceiling.
  {
    const Shape& s = shapes[0];
    DeviceTensors mem(*gpu);
    using K = RandomSpec::Kind;
    const int64_t m = s.b * s.t, d = s.h * s.p, groups = 8;
    const Tensor x = mem.random({m, d}, DType::bf16, "x", {K::normal, 1, 1, 0, 1});
    const Tensor z = mem.random({m, d}, DType::bf16, "z", {K::normal, 1, 2, 0, 1});
    const Tensor w = mem.random({d}, DType::f32, "w", {K::normal, 1, 3, 1, 0.1f});
    const Tensor y = mem.random({m, d}, DType::bf16, "y", {K::normal, 1, 4, 0, 1});
    const Tensor rstd = mem.random({m, groups}, DType::f32, "rstd", {K::normal, 1, 5, 0, 1});
    const Tensor dy = mem.random({m, d}, DType::bf16, "dy", {K::normal, 1, 6, 0, 1});
    const Tensor dx = mem.random({m, d}, DType::bf16, "dx", {K::normal, 1, 7, 0, 1});
    const Tensor dz = mem.random({m, d}, DType::bf16, "dz", {K::normal, 1, 8, 0, 1});
    const Tensor dw = mem.random({d}, DType::f32, "dw", {K::normal, 1, 9, 0, 1});
    const Tensor ws =
        mem.random({gated_rmsnorm_workspace_elems(x)}, DType::f32, "ws", {K::normal, 1, 10, 0, 1});
    const double fwd = median_ms([&] { gated_rmsnorm_forward(x, z, w, groups, 1e-5, y, rstd); });
    const double bwd =
        median_ms([&] { gated_rmsnorm_backward(x, z, w, groups, rstd, dy, dx, dz, dw, &ws); });
    const double e = double(m * d);
    std::printf("gated_rmsnorm M %lld D %lld: fwd %.4f ms (%.0f GB/s), bwd %.4f ms (%.0f GB/s)\n",
                (long long)m, (long long)d, fwd, 6 * e / (fwd * 1e-3) / 1e9, bwd,
                10 * e / (bwd * 1e-3) / 1e9);
    char row[512];
    std::snprintf(
        row, sizeof(row),
        ", {\"op\": \"gated_rmsnorm\", \"rows\": %lld, \"width\": %lld, \"groups\": %lld, "
        "\"fwd_ms\": %.5f, \"fwd_gb_per_s\": %.1f, \"bwd_ms\": %.5f, "
        "\"bwd_gb_per_s\": %.1f}",
        (long long)m, (long long)d, (long long)groups, fwd, 6 * e / (fwd * 1e-3) / 1e9, bwd,
        10 * e / (bwd * 1e-3) / 1e9);
    json += row;
  }
  json += "]";
  return bench::write_text(out, json) ? 0 : 1;
}
