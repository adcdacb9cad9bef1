// Selective scan benchmark: per shape (batch, channels, length, d_state), bf16 activations, real
// A, z gate, delta bias + softplus, B/C per token in one group (the shapes of the Mamba-1 issue),
// the forward time (median of 20 runs after 3 warm-ups, CUDA events), the bytes each input is
// read and each output written once, the achieved GB/s and the % of the memory floor at the
// measured device-to-device copy ceiling (2.97 TB/s on H100, ../shared/DEVICE.md).
// Usage: bench_selective_scan [--out results.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "layers/selective_scan/selective_scan.h"
#include "runtime/backend.h"
#include "runtime/cuda_check.h"

namespace {

using namespace braid;

struct Shape {
  int64_t b, c, t, n;
};

double median_ms(const std::function<void()>& f) {
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CUDA_CHECK(cudaEventRecord(e0));
    f();
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float m = 0;
    CUDA_CHECK(cudaEventElapsedTime(&m, e0, e1));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  auto gpu = make_cuda_backend(0);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double ceiling = 2.97e12;  // bytes/s, measured copy ceiling on H100 (DEVICE.md)
  const std::vector<Shape> shapes = {
      {4, 4096, 2048, 16}, {2, 4096, 8192, 16}, {4, 5120, 2048, 16}, {4, 4096, 2048, 64}};
  std::string json = "[";
  std::printf("%-26s %10s %10s %10s\n", "shape (B, C, T, N)", "fwd ms", "GB/s", "% floor");
  for (const Shape& s : shapes) {
    std::vector<void*> mem;
    auto alloc = [&](std::vector<int64_t> shape, DType t, const char* name, RandomSpec spec) {
      int64_t n = 1;
      for (int64_t x : shape) n *= x;
      void* d = gpu->allocate(n * dtype_size(t));
      mem.push_back(d);
      Tensor tt = Tensor::contiguous_view(d, t, Device::cuda, shape, name);
      gpu->fill_random(tt, spec, {});
      return tt;
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
    const ScanInputs in{&u, &delta, &A, &Bm, &Cm, &D, &z, &bias, nullptr, nullptr, true};
    const double ms = median_ms([&] { selective_scan_forward(in, y, nullptr); });
    const double bytes =
        2.0 * (4 * s.b * s.t * s.c + 2 * s.b * s.t * s.n) + 4.0 * (s.c * s.n + 2 * s.c);
    const double gbs = bytes / (ms * 1e-3) / 1e9, floor_ms = bytes / ceiling * 1e3;
    char label[64];
    std::snprintf(label, sizeof(label), "%lld, %lld, %lld, %lld", (long long)s.b, (long long)s.c,
                  (long long)s.t, (long long)s.n);
    std::printf("%-26s %10.4f %10.1f %9.1f%%\n", label, ms, gbs, 100.0 * floor_ms / ms);
    char row[512];
    std::snprintf(
        row, sizeof(row),
        "%s{\"batch\": %lld, \"channels\": %lld, \"length\": %lld, \"d_state\": %lld, \"fwd_ms\": "
        "%.5f, "
        "\"bytes\": %.0f, \"gb_per_s\": %.1f, \"floor_ms\": %.5f, \"pct_of_floor\": %.1f}",
        json.size() > 1 ? ", " : "", (long long)s.b, (long long)s.c, (long long)s.t, (long long)s.n,
        ms, bytes, gbs, floor_ms, 100.0 * floor_ms / ms);
    json += row;
    for (void* d : mem) gpu->release(d);
  }
  json += "]";
  if (!out.empty()) {
    FILE* f = std::fopen(out.c_str(), "w");
    std::fprintf(f, "{\"device\": \"%s\", \"forward\": %s}\n", prop.name, json.c_str());
    std::fclose(f);
  }
  return 0;
}
