// Gated RMSNorm forward and backward on the GPU against the CPU reference (skipped where no GPU
// is visible), plus bit-identical repeat runs.
// Tolerance (DESIGN: at most 2x the error of a naive same-precision implementation, against
// f64): the reference runs in f64 (the truth) and in f32 on the same inputs (bf16 cases: inputs
// rounded to bf16 first, bf16 outputs rounded to bf16). The kernels' sigmoid uses ex2.approx and
// rcp.approx (2^-22 relative each), far below the f32 rounding of a sum of D/G terms; 1e-6 of
// the output scale covers it.
#include <cmath>
#include <random>

#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct GatedCase {
  int64_t m, d, groups;
  bool bf16;
};

class GpuGatedNorm : public GpuTest<GatedCase> {};

TEST_P(GpuGatedNorm, ForwardAndBackwardMatchReference) {
  const GatedCase k = GetParam();
  const uint64_t seed = std::random_device{}();  // fresh inputs every run; printed on failure
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor x = random_tensor({k.m, k.d}, -2, 2, k.bf16, g),
                   z = random_tensor({k.m, k.d}, -3, 3, k.bf16, g),
                   dy = random_tensor({k.m, k.d}, -1, 1, k.bf16, g),
                   w = random_tensor({k.d}, 0.5, 1.5, false, g),
                   dw0 = random_tensor({k.d}, -1, 1, false, g);
  struct Run {
    Tensor x, z, w, y, rstd, dy, dx, dz, dw, ws;
  };
  auto run = [&](DType act, DType par, Device dev, Run& r) {
    r.x = make(x, act, dev, "x"), r.z = make(z, act, dev, "z"), r.w = make(w, par, dev, "w");
    r.dy = make(dy, act, dev, "dy"), r.dw = make(dw0, par, dev, "dw");
    r.y = empty({k.m, k.d}, act, dev, "y"), r.rstd = empty({k.m, k.groups}, par, dev, "rstd");
    r.dx = empty({k.m, k.d}, act, dev, "dx"), r.dz = empty({k.m, k.d}, act, dev, "dz");
    const int64_t wn = std::max<int64_t>(gated_rmsnorm_workspace_elems(r.x), 1);
    r.ws = empty({wn}, DType::f32, dev, "ws");
    if (dev == Device::cuda)
      for (const Tensor* t : {&r.y, &r.rstd, &r.dx, &r.dz, &r.ws}) gpu_->fill(*t, std::nan(""), {});
    gated_rmsnorm_forward(r.x, r.z, r.w, k.groups, 1e-5, r.y, r.rstd);
    gated_rmsnorm_backward(r.x, r.z, r.w, k.groups, r.rstd, r.dy, r.dx, r.dz, r.dw,
                           dev == Device::cuda ? &r.ws : nullptr);
  };
  Run r64, r32, rg;
  run(DType::f64, DType::f64, Device::cpu, r64);
  run(DType::f32, DType::f32, Device::cpu, r32);
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  run(act, DType::f32, Device::cuda, rg);
  auto check = [&](const char* what, Tensor Run::*field, bool activation) {
    const std::vector<double> ref = host_values(r64.*field, false),
                              naive = host_values(r32.*field, activation && k.bf16),
                              got = download(rg.*field);
    const double tol = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
    EXPECT_LE(max_err(got, ref), tol) << what << ": naive error " << max_err(naive, ref);
  };
  check("y", &Run::y, true);
  check("rstd", &Run::rstd, false);
  check("dx", &Run::dx, true);
  check("dz", &Run::dz, true);
  check("dw", &Run::dw, false);
  Run again;
  run(act, DType::f32, Device::cuda, again);
  for (Tensor Run::*f : {&Run::y, &Run::rstd, &Run::dx, &Run::dz, &Run::dw})
    EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
        << (rg.*f).name << " differs between runs";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuGatedNorm,
                         ::testing::Values(GatedCase{1, 64, 1, false}, GatedCase{300, 512, 8, true},
                                           GatedCase{1000, 4096, 1, true},
                                           GatedCase{257, 96, 3, false},
                                           GatedCase{513, 2048, 4, true},
                                           // groups of 2048, 256, 1024: the vector kernels
                                           GatedCase{130, 2048, 1, true},
                                           GatedCase{77, 1024, 4, false},
                                           GatedCase{64, 4096, 4, false}));

}  // namespace
}  // namespace braid
