// Attention benchmark (issue 5): causal, bf16, B T = 16384 tokens, H P = 2048, H = Hk, head dims
// 64 and 128 at lengths 1K-16K: forward and forward+backward times (median of 20 after 3
// warm-ups, CUDA events) and TFLOP/s with the count: forward 4 B H T^2 P / 2 (causal),
// backward 2.5x forward. The forward is timed on the default kernel (on sm_90 the Hopper
// warp-specialised one) and on the sm_80 (mma.sync) kernel; the backward deterministic (the
// default) and with unordered reductions.
// Peers (issue 5, H100, 2026-11-22): PyTorch's flash backend (FlashAttention-2) and cuDNN
// backend, fwd / fwd+bwd TFLOP/s, where measured. Also RoPE on q (bytes against the copy
// ceiling, 2.97 TB/s).
// Usage: bench_attention [--out results.json]
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "layers/attention/attention.h"
#include "layers/rope/rope.h"

namespace {

using namespace braid;
using bench::DeviceTensors;
using bench::median_ms;

struct Shape {
  int64_t p, t;
  double fa2_fwd, fa2_both, cudnn_fwd, cudnn_both;  // 0: not measured
};

}  // namespace

int main(int argc, char** argv) {
  const std::string out = bench::out_path(argc, argv);
  auto gpu = make_cuda_backend(0);
  const std::vector<Shape> shapes = {
      {64, 1024, 0, 0, 0, 0},          {64, 2048, 261, 211, 390, 332},
      {64, 4096, 0, 0, 0, 0},          {64, 8192, 293, 267, 431, 416},
      {64, 16384, 0, 0, 0, 0},         {128, 1024, 0, 0, 0, 0},
      {128, 2048, 283, 229, 499, 401}, {128, 4096, 0, 0, 0, 0},
      {128, 8192, 316, 293, 560, 505}, {128, 16384, 0, 0, 0, 0}};
  std::string json = "[";
  std::printf("%-10s %8s %8s %8s %8s %8s %8s %8s %10s %10s\n", "P, T", "fwd ms", "fwd TF",
              "sm80 TF", "f+b ms", "f+b TF", "f+b(at)", "FA2 f", "FA2 f+b", "cuDNN f+b");
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape& s = shapes[si];
    const int64_t b = 16384 / s.t, h = 2048 / s.p;
    DeviceTensors mem(*gpu);
    using K = RandomSpec::Kind;
    const std::vector<int64_t> shape{b, s.t, h, s.p};
    const Tensor q = mem.random(shape, DType::bf16, "q", {K::normal, 1, 1, 0, 1});
    const Tensor k = mem.random(shape, DType::bf16, "k", {K::normal, 1, 2, 0, 1});
    const Tensor v = mem.random(shape, DType::bf16, "v", {K::normal, 1, 3, 0, 1});
    const Tensor o = mem.random(shape, DType::bf16, "o", {K::normal, 1, 4, 0, 1});
    const Tensor lse = mem.random({b, h, s.t}, DType::f32, "lse", {K::normal, 1, 5, 0, 1});
    const Tensor dout = mem.random(shape, DType::bf16, "do", {K::normal, 1, 6, 0, 1});
    const Tensor dq = mem.random(shape, DType::bf16, "dq", {K::normal, 1, 7, 0, 1});
    const Tensor dk = mem.random(shape, DType::bf16, "dk", {K::normal, 1, 8, 0, 1});
    const Tensor dv = mem.random(shape, DType::bf16, "dv", {K::normal, 1, 9, 0, 1});
    AttentionInputs in;
    in.q = &q, in.k = &k, in.v = &v, in.scale = 1.0 / std::sqrt(double(s.p));
    const Tensor ws =
        mem.random({attention_gpu_workspace_elems(in)}, DType::f32, "ws", {K::normal, 1, 10, 0, 1});
    in.workspace = &ws;
    AttentionInputs atomics = in, sm80 = in;
    atomics.deterministic = false;
    sm80.hopper = false;
    const double fwd = median_ms([&] { attention_forward(in, o, lse); });
    const double fwd_sm80 = median_ms([&] { attention_forward(sm80, o, lse); });
    const double both = median_ms([&] {
      attention_forward(in, o, lse);
      attention_backward(in, o, lse, dout, dq, dk, dv);
    });
    const double both_at = median_ms([&] {
      attention_forward(atomics, o, lse);
      attention_backward(atomics, o, lse, dout, dq, dk, dv);
    });
    const double f = 4.0 * b * h * double(s.t) * s.t * s.p / 2;
    auto tf = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
    char label[32];
    std::snprintf(label, sizeof(label), "%lld, %lld", (long long)s.p, (long long)s.t);
    std::printf("%-10s %8.3f %8.1f %8.1f %8.3f %8.1f %8.1f %8.0f %10.0f %10.0f\n", label, fwd,
                tf(f, fwd), tf(f, fwd_sm80), both, tf(3.5 * f, both), tf(3.5 * f, both_at),
                s.fa2_fwd, s.fa2_both, s.cudnn_both);
    char row[768];
    std::snprintf(row, sizeof(row),
                  "%s{\"head_dim\": %lld, \"length\": %lld, \"batch\": %lld, \"heads\": %lld, "
                  "\"fwd_ms\": %.5f, \"fwd_tflops\": %.1f, \"fwd_sm80_tflops\": %.1f, "
                  "\"fwd_bwd_ms\": %.5f, "
                  "\"fwd_bwd_tflops\": %.1f, \"fwd_bwd_atomic_ms\": %.5f, "
                  "\"fwd_bwd_atomic_tflops\": %.1f, \"fa2_fwd_tflops\": %.0f, "
                  "\"fa2_fwd_bwd_tflops\": %.0f, \"cudnn_fwd_tflops\": %.0f, "
                  "\"cudnn_fwd_bwd_tflops\": %.0f}",
                  si ? ", " : "", (long long)s.p, (long long)s.t, (long long)b, (long long)h, fwd,
                  tf(f, fwd), tf(f, fwd_sm80), both, tf(3.5 * f, both), both_at,
                  tf(3.5 * f, both_at), s.fa2_fwd, s.fa2_both, s.cudnn_fwd, s.cudnn_both);
    json += row;
  }
  {  // RoPE on a q tensor of 16384 tokens x 16 heads x 128, in place.
    DeviceTensors mem(*gpu);
    using K = RandomSpec::Kind;
    const Tensor x = mem.random({1, 16384, 16, 128}, DType::bf16, "x", {K::normal, 1, 1, 0, 1});
    const Tensor pos = mem.random({1, 16384}, DType::f32, "pos", {K::normal, 1, 2, 0, 1});
    const Tensor ipos =
        Tensor::contiguous_view(pos.data, DType::i32, Device::cuda, {1, 16384}, "positions");
    gpu->fill(ipos, 4097.0, {});
    const double ms = median_ms([&] { rope_forward(x, ipos, 10000.0, x); });
    const double bytes = 2.0 * 2 * 16384 * 16 * 128;
    std::printf("rope 16384 x 16 x 128 bf16: %.4f ms (%.0f GB/s)\n", ms, bytes / (ms * 1e-3) / 1e9);
    char row[256];
    std::snprintf(row, sizeof(row),
                  ", {\"op\": \"rope\", \"tokens\": 16384, \"heads\": 16, \"head_dim\": 128, "
                  "\"ms\": %.5f, \"gb_per_s\": %.1f}",
                  ms, bytes / (ms * 1e-3) / 1e9);
    json += row;
  }
  json += "]";
  return bench::write_text(out, json) ? 0 : 1;
}
