// AdamW on the GPU against the CPU optimizer (skipped where no GPU is visible): the same
// parameters (Philox initialisation, equal on both devices) and gradients for 5 steps with
// clipping active, decayed, non-decayed and frozen parameters, and tensors of several chunks.
// Tolerance: both run the same f32 formula per element; the GPU may fuse a multiply and an add
// (one rounding less), so each step's update can differ by a few f32 ulps of the terms (|m /
// sqrt(v)| <= ~3, times lr = 1e-2): 1e-7 absolute per step, 1e-6 over 5 steps is ample while a
// wrong moment, decay or bias correction moves values by ~1e-3. The gradient norm sums f64
// squares in another grouping: 1e-12 relative. bf16 parameters: the CPU runs from the same
// bf16-rounded values and gradients, and each GPU parameter is its master rounded to bf16.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "layers/model/params.h"
#include "optim/adamw.h"
#include "runtime/backend.h"

namespace braid {
namespace {

std::vector<float> download(Backend& gpu, const Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.dtype == DType::f32) {
    gpu.copy(out.data(), Device::cpu, t.data, Device::cuda, t.nbytes(), {});
  } else {
    std::vector<bf16> raw(t.numel());
    gpu.copy(raw.data(), Device::cpu, t.data, Device::cuda, t.nbytes(), {});
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = from_bf16(raw[i]);
  }
  gpu.synchronize({});
  return out;
}
void upload(Backend& gpu, const Tensor& t, const std::vector<float>& v) {
  if (t.dtype == DType::f32) {
    gpu.copy(t.data, Device::cuda, v.data(), Device::cpu, t.nbytes(), {});
  } else {
    std::vector<bf16> raw(v.size());
    for (size_t i = 0; i < v.size(); ++i) raw[i] = to_bf16(v[i]);
    gpu.copy(t.data, Device::cuda, raw.data(), Device::cpu, t.nbytes(), {});
  }
  gpu.synchronize({});
}

class GpuAdamW : public ::testing::TestWithParam<DType> {};

TEST_P(GpuAdamW, MatchesCpuOptimizer) {
  if (!cuda_device_available()) GTEST_SKIP() << "no GPU visible: CUDA kernel tests skipped";
  const DType dt = GetParam();
  auto gpu = make_cuda_backend(0);
  auto cpu = make_cpu_backend();
  auto add_all = [](ParamSet& ps) {
    ps.add("w1", {1000}, {ParamInit::Kind::normal, 0.5}, true);
    ps.add("w2", {300, 700}, {ParamInit::Kind::normal, 0.5}, true);  // 4 chunks
    ps.add("norm.weight", {64}, {ParamInit::Kind::constant, 1.0}, false);
    ps.add("frozen", {10}, {ParamInit::Kind::normal, 0.5}, false, false);
  };
  ParamSet pg, pc;
  add_all(pg), add_all(pc);
  pg.allocate(*gpu, dt);
  pc.allocate(*cpu, DType::f32);
  pg.initialize(7);
  // The CPU starts from the GPU's values (bf16-rounded for bf16 parameters).
  for (size_t i = 0; i < pg.all().size(); ++i) {
    const std::vector<float> v = download(*gpu, pg.all()[i].value);
    std::copy(v.begin(), v.end(), pc.all()[i].value.ptr<float>());
  }
  const AdamWConfig cfg{0.9, 0.95, 1e-8, 0.1, 1.0};
  AdamW og(pg, cfg, *gpu), oc(pc, cfg, *cpu);
  std::mt19937_64 g(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int step = 1; step <= 5; ++step) {
    for (size_t i = 0; i < pg.all().size(); ++i) {
      const Param& p = pg.all()[i];
      if (!p.trainable) continue;
      std::vector<float> grad(p.value.numel());
      for (float& x : grad) x = dt == DType::bf16 ? from_bf16(to_bf16(nd(g))) : nd(g);
      upload(*gpu, p.grad, grad);
      std::copy(grad.begin(), grad.end(), pc.all()[i].grad.ptr<float>());
    }
    const double ng = og.grad_norm(), nc = oc.grad_norm();
    EXPECT_NEAR(ng, nc, 1e-12 * nc) << "step " << step;
    og.step(0.01, ng);
    oc.step(0.01, nc);
  }
  for (size_t i = 0; i < pg.all().size(); ++i) {
    const Param& p = pg.all()[i];
    const std::vector<float> got = download(*gpu, p.value);
    const float* want = pc.all()[i].value.ptr<float>();
    double err = 0;
    for (size_t j = 0; j < got.size(); ++j)
      err = std::max(err,
                     std::fabs(double(got[j]) -
                               double(dt == DType::bf16 ? from_bf16(to_bf16(want[j])) : want[j])));
    // bf16: the GPU parameter is its master rounded; the masters agree to 1e-6, so the rounded
    // values agree except where a master sits within 1e-6 of a rounding boundary (one bf16 ulp).
    const double tol = dt == DType::bf16 ? std::ldexp(1.0, -7) : 1e-6;
    EXPECT_LE(err, tol) << p.name;
  }
  for (size_t i = 0; i < og.state().size(); ++i) {
    const std::vector<float> got = download(*gpu, og.state()[i].master);
    const float* want = oc.state()[i].master.ptr<float>();
    double err = 0;
    for (size_t j = 0; j < got.size(); ++j)
      err = std::max(err, std::fabs(double(got[j]) - double(want[j])));
    EXPECT_LE(err, 1e-6) << og.state()[i].param->name << " master";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GpuAdamW, ::testing::Values(DType::f32, DType::bf16));

}  // namespace
}  // namespace braid
