// Selective scan benchmark: per shape (batch, channels, length, d_state), bf16 activations, real
// A, z gate, delta bias + softplus, B/C per token in one group (the shapes of the Mamba-1 issue),
// the forward (saving chunk states, as in training) and backward times (median of 20 runs after
// 3 warm-ups, CUDA events), the bytes each input is read and each output written once, the
// achieved GB/s, the % of the memory floor at the measured device-to-device copy ceiling
// (2.97 TB/s on H100, ../shared/DEVICE.md) and the ratio to mamba_ssm's times from the issue.
// Usage: bench_selective_scan [--out results.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "layers/causal_conv1d/causal_conv1d.h"
#include "layers/selective_scan/selective_scan.h"
#include "runtime/backend.h"
#include "runtime/cuda_check.h"

namespace {

using namespace braid;
using bench::DeviceTensors;
using bench::median_ms;

struct Shape {
  int64_t b, c, t, n;
};

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  auto gpu = make_cuda_backend(0);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double ceiling = 2.97e12;  // bytes/s, measured copy ceiling on H100 (DEVICE.md)
  // mamba_ssm's times from the issue (H100, 2026-11-22); 0 where not given.
  const std::vector<Shape> shapes = {
      {4, 4096, 2048, 16}, {2, 4096, 8192, 16}, {4, 5120, 2048, 16}, {4, 4096, 2048, 64}};
  const double peer[][2] = {{0.593, 2.43}, {1.46, 4.93}, {0.733, 3.05}, {0, 0}};
  std::string json = "[";
  std::printf("%-20s %8s %8s %7s %8s %8s %7s %9s %9s\n", "B, C, T, N", "fwd ms", "GB/s", "%floor",
              "bwd ms", "GB/s", "%floor", "fwd/peer", "bwd/peer");
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape& s = shapes[si];
    DeviceTensors mem(*gpu);
    auto alloc = [&](std::vector<int64_t> shape, DType t, const char* name, RandomSpec spec) {
      return mem.random(std::move(shape), t, name, spec);
    };
    using K = RandomSpec::Kind;
    const Tensor u = alloc({s.b, s.t, s.c}, DType::bf16, "u", {K::normal, 1, 1, 0, 1});
    const Tensor delta = alloc({s.b, s.t, s.c}, DType::bf16, "delta", {K::uniform, 1, 2, -3, 0});
    const Tensor z = alloc({s.b, s.t, s.c}, DType::bf16, "z", {K::normal, 1, 3, 0, 1});
    const Tensor Bm = alloc({s.b, s.t, 1, s.n}, DType::bf16, "B", {K::normal, 1, 4, 0, 1});
    const Tensor Cm = alloc({s.b, s.t, 1, s.n}, DType::bf16, "C", {K::normal, 1, 5, 0, 1});
    const Tensor A = alloc({s.c, s.n}, DType::f32, "A", {K::uniform, 1, 6, -2, -0.1f});
    const Tensor D = alloc({s.c}, DType::f32, "D", {K::normal, 1, 7, 0, 1});
    const Tensor bias = alloc({s.c}, DType::f32, "bias", {K::uniform, 1, 8, -4, -2});
    const Tensor y = alloc({s.b, s.t, s.c}, DType::bf16, "y", {K::normal, 1, 9, 0, 1});
    const Tensor dy = alloc({s.b, s.t, s.c}, DType::bf16, "dy", {K::normal, 1, 10, 0, 1});
    const Tensor du = alloc({s.b, s.t, s.c}, DType::bf16, "du", {K::normal, 1, 11, 0, 1});
    const Tensor ddelta = alloc({s.b, s.t, s.c}, DType::bf16, "ddelta", {K::normal, 1, 12, 0, 1});
    const Tensor dz = alloc({s.b, s.t, s.c}, DType::bf16, "dz", {K::normal, 1, 13, 0, 1});
    const Tensor dB = alloc({s.b, s.t, 1, s.n}, DType::bf16, "dB", {K::normal, 1, 14, 0, 1});
    const Tensor dC = alloc({s.b, s.t, 1, s.n}, DType::bf16, "dC", {K::normal, 1, 15, 0, 1});
    const Tensor dA = alloc({s.c, s.n}, DType::f32, "dA", {K::normal, 1, 16, 0, 1});
    const Tensor dD = alloc({s.c}, DType::f32, "dD", {K::normal, 1, 17, 0, 1});
    const Tensor dbias = alloc({s.c}, DType::f32, "dbias", {K::normal, 1, 18, 0, 1});
    const ScanInputs in{&u, &delta, &A, &Bm, &Cm, &D, &z, &bias, nullptr, nullptr, true};
    const Tensor ws = alloc({selective_scan_workspace_elems(in)}, DType::f32, "workspace",
                            {K::normal, 1, 19, 0, 1});
    const double fwd = median_ms([&] { selective_scan_forward(in, y, nullptr, &ws); });
    // Every forward variant (threads per channel; the default picks one by size).
    std::string by_lanes;
    for (int lanes : s.n <= 16 ? std::vector<int>{4, 8} : std::vector<int>{}) {
      ScanInputs v = in;
      v.fwd_lanes = lanes;
      const double ms = median_ms([&] { selective_scan_forward(v, y, nullptr, &ws); });
      std::printf("  fwd with %2d lanes per channel: %.4f ms\n", lanes, ms);
      by_lanes +=
          (by_lanes.empty() ? "\"" : ", \"") + std::to_string(lanes) + "\": " + std::to_string(ms);
    }
    const double bwd = median_ms([&] {
      selective_scan_backward(in, dy, nullptr,
                              {&du, &ddelta, &dA, &dB, &dC, &dD, &dz, &bias, nullptr}, ws);
    });
    // Memory floor: each input read once, each output written once (bf16 activations).
    const double act = double(s.b * s.t * s.c), bc = double(s.b * s.t * s.n);
    const double fwd_bytes = 2.0 * (4 * act + 2 * bc) + 4.0 * (s.c * s.n + 2 * s.c);
    const double bwd_bytes = 2.0 * (7 * act + 4 * bc) + 4.0 * 2 * (s.c * s.n + 2 * s.c);
    auto gbs = [](double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; };
    auto pct = [&](double bytes, double ms) { return 100.0 * bytes / ceiling * 1e3 / ms; };
    char label[64];
    std::snprintf(label, sizeof(label), "%lld, %lld, %lld, %lld", (long long)s.b, (long long)s.c,
                  (long long)s.t, (long long)s.n);
    std::printf("%-20s %8.4f %8.1f %6.1f%% %8.4f %8.1f %6.1f%% %9.3f %9.3f\n", label, fwd,
                gbs(fwd_bytes, fwd), pct(fwd_bytes, fwd), bwd, gbs(bwd_bytes, bwd),
                pct(bwd_bytes, bwd), peer[si][0] > 0 ? fwd / peer[si][0] : 0.0,
                peer[si][1] > 0 ? bwd / peer[si][1] : 0.0);
    char row[1024];
    std::snprintf(row, sizeof(row),
                  "%s{\"batch\": %lld, \"channels\": %lld, \"length\": %lld, \"d_state\": %lld, "
                  "\"fwd_ms\": %.5f, \"fwd_bytes\": %.0f, \"fwd_gb_per_s\": %.1f, "
                  "\"fwd_pct_of_floor\": %.1f, \"bwd_ms\": %.5f, \"bwd_bytes\": %.0f, "
                  "\"bwd_gb_per_s\": %.1f, \"bwd_pct_of_floor\": %.1f, \"mamba_ssm_fwd_ms\": %.3f, "
                  "\"mamba_ssm_bwd_ms\": %.3f, \"fwd_ms_by_lanes\": {%s}}",
                  json.size() > 1 ? ", " : "", (long long)s.b, (long long)s.c, (long long)s.t,
                  (long long)s.n, fwd, fwd_bytes, gbs(fwd_bytes, fwd), pct(fwd_bytes, fwd), bwd,
                  bwd_bytes, gbs(bwd_bytes, bwd), pct(bwd_bytes, bwd), peer[si][0], peer[si][1],
                  by_lanes.c_str());
    json += row;
  }
  json += "]";
  // The causal conv1d of the same Mamba-1 layers, and of hybrid_1b.yaml's Mamba-2 layers (x: 4096
  // channels, B and C: 1024 each), width 4, SiLU, bias, bf16: memory floor = x read and y written
  // (forward), x and dy read and dx written (backward).
  const std::vector<Shape> conv_shapes = {{4, 4096, 2048, 16},
                                          {2, 4096, 8192, 16},
                                          {4, 5120, 2048, 16},
                                          {4, 4096, 4096, 0},
                                          {4, 1024, 4096, 0}};
  std::string conv_json = "[";
  std::printf("\n%-20s %8s %8s %7s %8s %8s %7s\n", "conv1d B, C, T", "fwd ms", "GB/s", "%floor",
              "bwd ms", "GB/s", "%floor");
  for (const Shape& s : conv_shapes) {
    DeviceTensors mem(*gpu);
    auto alloc = [&](std::vector<int64_t> shape, DType t, const char* name, RandomSpec spec) {
      return mem.random(std::move(shape), t, name, spec);
    };
    using K = RandomSpec::Kind;
    const Tensor x = alloc({s.b, s.t, s.c}, DType::bf16, "x", {K::normal, 2, 1, 0, 1});
    const Tensor w = alloc({s.c, 4}, DType::bf16, "w", {K::normal, 2, 2, 0, 0.5f});
    const Tensor bias = alloc({s.c}, DType::bf16, "bias", {K::normal, 2, 3, 0, 0.1f});
    const Tensor y = alloc({s.b, s.t, s.c}, DType::bf16, "y", {K::normal, 2, 4, 0, 1});
    const Tensor dy = alloc({s.b, s.t, s.c}, DType::bf16, "dy", {K::normal, 2, 5, 0, 1});
    const Tensor dx = alloc({s.b, s.t, s.c}, DType::bf16, "dx", {K::normal, 2, 6, 0, 1});
    const Tensor dw = alloc({s.c, 4}, DType::bf16, "dw", {K::normal, 2, 7, 0, 1});
    const Tensor db = alloc({s.c}, DType::bf16, "db", {K::normal, 2, 8, 0, 1});
    const Conv1dInputs in{&x, &w, &bias, nullptr, nullptr, true};
    const Tensor ws =
        alloc({causal_conv1d_workspace_elems(in)}, DType::f32, "ws", {K::normal, 2, 9, 0, 1});
    const double fwd = median_ms([&] { causal_conv1d_forward(in, y, nullptr); });
    const double bwd = median_ms([&] {
      causal_conv1d_backward(in, dy, nullptr, {&dx, &dw, &db, nullptr}, &ws);
    });
    const double act = 2.0 * s.b * s.t * s.c, fb = 2 * act, bb = 3 * act;
    auto gbs = [](double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; };
    auto pct = [&](double bytes, double ms) { return 100.0 * bytes / ceiling * 1e3 / ms; };
    char label[64], row[512];
    std::snprintf(label, sizeof(label), "%lld, %lld, %lld", (long long)s.b, (long long)s.c,
                  (long long)s.t);
    std::printf("%-20s %8.4f %8.1f %6.1f%% %8.4f %8.1f %6.1f%%\n", label, fwd, gbs(fb, fwd),
                pct(fb, fwd), bwd, gbs(bb, bwd), pct(bb, bwd));
    std::snprintf(row, sizeof(row),
                  "%s{\"batch\": %lld, \"channels\": %lld, \"length\": %lld, \"width\": 4, "
                  "\"fwd_ms\": %.5f, \"fwd_pct_of_floor\": %.1f, \"bwd_ms\": %.5f, "
                  "\"bwd_pct_of_floor\": %.1f}",
                  conv_json.size() > 1 ? ", " : "", (long long)s.b, (long long)s.c, (long long)s.t,
                  fwd, pct(fb, fwd), bwd, pct(bb, bwd));
    conv_json += row;
  }
  conv_json += "]";
  if (!out.empty()) {
    FILE* f = std::fopen(out.c_str(), "w");
    std::fprintf(f, "{\"device\": \"%s\", \"shapes\": %s, \"conv1d\": %s}\n", prop.name,
                 json.c_str(), conv_json.c_str());
    std::fclose(f);
  }
  return 0;
}
