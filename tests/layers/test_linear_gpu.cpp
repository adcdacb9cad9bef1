// The GPU linear (cuBLASLt) against the CPU reference (skipped where no GPU is visible): y, dx,
// dW (+=) and db (+=), with and without a bias, bf16 and f32, mixed precision (bf16 operands, f32
// y and dW), dx accumulated (+=), plus bit-identical repeat runs.
// Tolerance (DESIGN: at most 2x the error of a naive same-precision implementation, against
// f64): the reference in f64 and in f32 on the same (bf16-rounded) inputs; cuBLASLt accumulates
// in f32 like the naive loop, in a blocked order whose error is no larger; plus 1e-6 of the scale.
#include <cmath>
#include <random>

#include "layers/linear/linear.h"
#include "layers/linear/linear_cuda.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct LinearCase {
  int64_t m, in, out;
  bool bias, bf16;
  bool mixed = false;       // bf16 operands, f32 y and dW
  bool accumulate = false;  // dx += dy W
};

class GpuLinear : public GpuTest<LinearCase> {};

TEST_P(GpuLinear, MatchesReference) {
  const LinearCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor x = random_tensor({k.m, k.in}, -1, 1, k.bf16, g),
                   w = random_tensor({k.out, k.in}, -1, 1, k.bf16, g),
                   b = random_tensor({k.out}, -1, 1, k.bf16, g),
                   dy = random_tensor({k.m, k.out}, -1, 1, k.bf16, g),
                   dw0 = random_tensor({k.out, k.in}, -1, 1, k.bf16, g),
                   db0 = random_tensor({k.out}, -1, 1, k.bf16, g),
                   dx0 = random_tensor({k.m, k.in}, -1, 1, k.bf16, g);
  GemmContext gemm(*gpu_);
  struct Run {
    Tensor x, w, b, y, dy, dx, dw, db;
  };
  // ot: the dtype of y and dW (f32 under mixed precision on the GPU).
  auto run = [&](DType dt, Device dev, Run& r) {
    const DType ot = dev == Device::cuda && k.mixed ? DType::f32 : dt;
    r.x = make(x, dt, dev, "x"), r.w = make(w, dt, dev, "W"), r.b = make(b, dt, dev, "b");
    r.dy = make(dy, dt, dev, "dy"), r.dw = make(dw0, ot, dev, "dW"),
    r.db = make(db0, dt, dev, "db");
    r.y = empty({k.m, k.out}, ot, dev, "y");
    r.dx = k.accumulate ? make(dx0, dt, dev, "dx") : empty({k.m, k.in}, dt, dev, "dx");
    if (dev == Device::cuda) {
      gpu_->fill(r.y, std::nan(""), {});
      if (!k.accumulate) gpu_->fill(r.dx, std::nan(""), {});
    }
    const GemmContext* ctx = dev == Device::cuda ? &gemm : nullptr;
    linear_forward(r.x, r.w, k.bias ? &r.b : nullptr, r.y, ctx);
    linear_backward(r.x, r.w, r.dy, &r.dx, r.dw, k.bias ? &r.db : nullptr, ctx, k.accumulate);
  };
  Run r64, r32, rg, again;
  run(DType::f64, Device::cpu, r64);
  run(DType::f32, Device::cpu, r32);
  const DType dt = k.bf16 ? DType::bf16 : DType::f32;
  run(dt, Device::cuda, rg);
  // The naive result is rounded as the GPU's output is stored (not for f32 outputs).
  auto check = [&](const char* what, Tensor Run::*f) {
    const bool rounded = k.bf16 && (rg.*f).dtype == DType::bf16;
    const std::vector<double> ref = host_values(r64.*f, false),
                              naive = host_values(r32.*f, rounded), got = download(rg.*f);
    EXPECT_LE(max_err(got, ref), 2 * max_err(naive, ref) + 1e-6 * max_abs(ref))
        << what << ": naive error " << max_err(naive, ref);
  };
  check("y", &Run::y);
  check("dx", &Run::dx);
  check("dW", &Run::dw);
  if (k.bias) check("db", &Run::db);
  run(dt, Device::cuda, again);
  for (Tensor Run::*f : {&Run::y, &Run::dx, &Run::dw, &Run::db})
    EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
        << (rg.*f).name << " differs between runs";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuLinear,
                         ::testing::Values(LinearCase{64, 128, 96, false, false},
                                           LinearCase{300, 256, 512, true, true},
                                           LinearCase{1000, 64, 128, true, false},
                                           LinearCase{7, 32, 16, false, true},
                                           LinearCase{2048, 1024, 1024, false, true},
                                           LinearCase{500, 256, 384, false, true, true, true},
                                           LinearCase{129, 64, 200, false, true, true, false},
                                           LinearCase{96, 128, 64, true, false, false, true}));

}  // namespace
}  // namespace braid
