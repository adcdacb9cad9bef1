// RMSNorm (the gated RMSNorm's kernels without a gate) and SwiGLU on the GPU against the CPU
// reference (skipped where no GPU is visible), plus bit-identical repeat runs.
// Tolerance (DESIGN: at most 2x the error of a naive same-precision implementation, against
// f64): the reference runs in f64 (the truth) and in f32 on the same inputs (bf16 cases: inputs
// rounded to bf16 first, bf16 outputs rounded to bf16). The kernels' sigmoid uses ex2.approx and
// rcp.approx (2^-22 relative each), below the f32 rounding of the outputs; 1e-6 of the output
// scale covers it.
#include <cmath>
#include <functional>
#include <random>

#include "layers/rmsnorm/rmsnorm.h"
#include "layers/swiglu/swiglu.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct RowsCase {
  int64_t m, d;
  bool bf16;
};

class GpuRmsNormSwiglu : public GpuTest<RowsCase> {
 protected:
  // One output of the three paths (f64 and f32 on the CPU, the GPU) against the bound.
  void expect_within(const char* what, const Tensor& f64, const Tensor& f32, const Tensor& gpu,
                     bool activation) {
    const std::vector<double> ref = host_values(f64, false),
                              naive = host_values(f32, activation && GetParam().bf16),
                              got = download(gpu);
    const double tol = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
    EXPECT_LE(max_err(got, ref), tol) << what << ": naive error " << max_err(naive, ref);
  }
};

TEST_P(GpuRmsNormSwiglu, RmsNormMatchesReference) {
  const RowsCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor x = random_tensor({k.m, k.d}, -2, 2, k.bf16, g),
                   dy = random_tensor({k.m, k.d}, -1, 1, k.bf16, g),
                   w = random_tensor({k.d}, 0.5, 1.5, false, g),
                   dw0 = random_tensor({k.d}, -1, 1, false, g);
  struct Run {
    Tensor x, w, y, rstd, dy, dx, dw, ws;
  };
  auto run = [&](DType act, DType par, Device dev, Run& r) {
    r.x = make(x, act, dev, "x"), r.w = make(w, par, dev, "w"), r.dy = make(dy, act, dev, "dy");
    r.dw = make(dw0, par, dev, "dw");
    r.y = empty({k.m, k.d}, act, dev, "y"), r.rstd = empty({k.m}, par, dev, "rstd");
    r.dx = empty({k.m, k.d}, act, dev, "dx");
    r.ws = empty({std::max<int64_t>(rmsnorm_workspace_elems(r.x), 1)}, DType::f32, dev, "ws");
    if (dev == Device::cuda)
      for (const Tensor* t : {&r.y, &r.rstd, &r.dx, &r.ws}) gpu_->fill(*t, std::nan(""), {});
    rmsnorm_forward(r.x, r.w, 1e-5, r.y, r.rstd);
    rmsnorm_backward(r.x, r.w, r.rstd, r.dy, r.dx, r.dw, dev == Device::cuda ? &r.ws : nullptr);
  };
  Run r64, r32, rg, again;
  run(DType::f64, DType::f64, Device::cpu, r64);
  run(DType::f32, DType::f32, Device::cpu, r32);
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  run(act, DType::f32, Device::cuda, rg);
  expect_within("y", r64.y, r32.y, rg.y, true);
  expect_within("rstd", r64.rstd, r32.rstd, rg.rstd, false);
  expect_within("dx", r64.dx, r32.dx, rg.dx, true);
  expect_within("dw", r64.dw, r32.dw, rg.dw, false);
  run(act, DType::f32, Device::cuda, again);
  for (Tensor Run::*f : {&Run::y, &Run::rstd, &Run::dx, &Run::dw})
    EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
        << (rg.*f).name << " differs between runs";
}

// The residual add fused with the norm: s = a + b is the one rounding of the f32 sum (exact);
// y and rstd are the norm of that s (the reference runs on the GPU's s); the backward adding into
// dx matches the reference's dx0 + dx under the same bound.
TEST_P(GpuRmsNormSwiglu, AddRmsNormAndAccumulateMatchReference) {
  const RowsCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor a = random_tensor({k.m, k.d}, -2, 2, k.bf16, g),
                   b = random_tensor({k.m, k.d}, -2, 2, k.bf16, g),
                   dy = random_tensor({k.m, k.d}, -1, 1, k.bf16, g),
                   dx0 = random_tensor({k.m, k.d}, -1, 1, k.bf16, g),
                   w = random_tensor({k.d}, 0.5, 1.5, false, g),
                   dw0 = random_tensor({k.d}, -1, 1, false, g);
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  const Tensor ga = make(a, act, Device::cuda, "a"), gb = make(b, act, Device::cuda, "b"),
               gw = make(w, DType::f32, Device::cuda, "w"),
               gs = empty({k.m, k.d}, act, Device::cuda, "s"),
               gy = empty({k.m, k.d}, act, Device::cuda, "y"),
               grs = empty({k.m}, DType::f32, Device::cuda, "rstd");
  for (const Tensor* t : {&gs, &gy, &grs}) gpu_->fill(*t, std::nan(""), {});
  add_rmsnorm_forward(ga, gb, gw, 1e-5, gs, gy, grs);
  const std::vector<double> s = download(gs);
  for (int64_t i = 0; i < k.m * k.d; ++i) {
    const float sum = float(a.v[i]) + float(b.v[i]);
    ASSERT_EQ(s[i], k.bf16 ? double(from_bf16(to_bf16(sum))) : double(sum)) << "s at " << i;
  }
  const HostTensor sh{{k.m, k.d}, s};
  struct Run {
    Tensor x, w, y, rstd, dy, dx, dw, ws;
  };
  auto run = [&](DType t, Run& r) {  // the CPU reference on the GPU's s
    r.x = make(sh, t, Device::cpu, "s"), r.w = make(w, t, Device::cpu, "w");
    r.dy = make(dy, t, Device::cpu, "dy"), r.dx = make(dx0, t, Device::cpu, "dx");
    r.dw = make(dw0, t, Device::cpu, "dw");
    r.y = empty({k.m, k.d}, t, Device::cpu, "y"), r.rstd = empty({k.m}, t, Device::cpu, "rstd");
    rmsnorm_forward(r.x, r.w, 1e-5, r.y, r.rstd);
    rmsnorm_backward(r.x, r.w, r.rstd, r.dy, r.dx, r.dw, nullptr, nullptr, true);
  };
  Run r64, r32;
  run(DType::f64, r64);
  run(DType::f32, r32);
  const Tensor gdy = make(dy, act, Device::cuda, "dy"), gdx = make(dx0, act, Device::cuda, "dx"),
               gdw = make(dw0, DType::f32, Device::cuda, "dw"),
               ws = empty({std::max<int64_t>(rmsnorm_workspace_elems(gs), 1)}, DType::f32,
                          Device::cuda, "ws");
  rmsnorm_backward(gs, gw, grs, gdy, gdx, gdw, &ws, nullptr, true);
  expect_within("y", r64.y, r32.y, gy, true);
  expect_within("rstd", r64.rstd, r32.rstd, grs, false);
  expect_within("dx (accumulated)", r64.dx, r32.dx, gdx, true);
  expect_within("dw", r64.dw, r32.dw, gdw, false);
}

TEST_P(GpuRmsNormSwiglu, SwigluMatchesReference) {
  const RowsCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor a = random_tensor({k.m, k.d}, -4, 4, k.bf16, g),
                   b = random_tensor({k.m, k.d}, -2, 2, k.bf16, g),
                   dy = random_tensor({k.m, k.d}, -1, 1, k.bf16, g);
  struct Run {
    Tensor a, b, y, dy, da, db;
  };
  auto run = [&](DType act, Device dev, Run& r) {
    r.a = make(a, act, dev, "a"), r.b = make(b, act, dev, "b"), r.dy = make(dy, act, dev, "dy");
    r.y = empty({k.m, k.d}, act, dev, "y"), r.da = empty({k.m, k.d}, act, dev, "da");
    r.db = empty({k.m, k.d}, act, dev, "db");
    if (dev == Device::cuda)
      for (const Tensor* t : {&r.y, &r.da, &r.db}) gpu_->fill(*t, std::nan(""), {});
    swiglu_forward(r.a, r.b, r.y);
    swiglu_backward(r.a, r.b, r.dy, r.da, r.db);
  };
  Run r64, r32, rg, again;
  run(DType::f64, Device::cpu, r64);
  run(DType::f32, Device::cpu, r32);
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  run(act, Device::cuda, rg);
  expect_within("y", r64.y, r32.y, rg.y, true);
  expect_within("da", r64.da, r32.da, rg.da, true);
  expect_within("db", r64.db, r32.db, rg.db, true);
  run(act, Device::cuda, again);
  for (Tensor Run::*f : {&Run::y, &Run::da, &Run::db})
    EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
        << (rg.*f).name << " differs between runs";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuRmsNormSwiglu,
                         ::testing::Values(RowsCase{1, 64, false}, RowsCase{300, 512, true},
                                           RowsCase{1000, 4096, true}, RowsCase{257, 96, false},
                                           RowsCase{3, 5, true}, RowsCase{129, 2048, true},
                                           RowsCase{65, 1024, false}, RowsCase{40, 256, true}));

}  // namespace
}  // namespace braid
