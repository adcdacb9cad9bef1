// AdamW against a hand-computed reference (decay exclusions, bias correction, clipping), the
// global gradient norm, and the LR schedules.
#include <gtest/gtest.h>

#include <cmath>

#include "layers/model/params.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "runtime/check.h"

namespace braid {
namespace {

TEST(AdamW, MatchesReferenceWithDecayExclusionAndClipping) {
  auto be = make_cpu_backend();
  ParamSet ps;
  ps.add("w", {3}, {ParamInit::Kind::constant, 0.5}, true);
  ps.add("norm.weight", {2}, {ParamInit::Kind::constant, 1.0}, false);
  ps.allocate(*be, DType::f32);
  ps.initialize(1);
  const AdamWConfig cfg{0.9, 0.95, 1e-8, 0.1, 1.0};
  AdamW opt(ps, cfg, *be);
  const float gw[3] = {3.0f, -4.0f, 0.0f}, gn[2] = {0.0f, 12.0f};  // global norm 13
  double mw[3] = {}, vw[3] = {}, pw[3] = {0.5, 0.5, 0.5}, mn[2] = {}, vn[2] = {}, pn[2] = {1, 1};
  for (int step = 1; step <= 3; ++step) {
    std::copy(gw, gw + 3, ps.all()[0].grad.ptr<float>());
    std::copy(gn, gn + 2, ps.all()[1].grad.ptr<float>());
    const double norm = opt.grad_norm();
    EXPECT_NEAR(norm, 13.0, 1e-6);
    const double lr = 0.01, clip = 1.0 / (13.0 + 1e-6);
    opt.step(lr, norm);
    auto ref = [&](double* p, double* m, double* v, const float* g, int n, bool decay) {
      for (int i = 0; i < n; ++i) {
        const double gi = g[i] * clip;
        m[i] = 0.9 * m[i] + 0.1 * gi;
        v[i] = 0.95 * v[i] + 0.05 * gi * gi;
        const double mh = m[i] / (1 - std::pow(0.9, step)), vh = v[i] / (1 - std::pow(0.95, step));
        p[i] = p[i] * (decay ? 1 - lr * 0.1 : 1.0) - lr * mh / (std::sqrt(vh) + 1e-8);
      }
    };
    ref(pw, mw, vw, gw, 3, true);
    ref(pn, mn, vn, gn, 2, false);
    for (int i = 0; i < 3; ++i)
      EXPECT_NEAR(ps.all()[0].value.ptr<float>()[i], pw[i], 2e-6) << "step " << step;
    for (int i = 0; i < 2; ++i)
      EXPECT_NEAR(ps.all()[1].value.ptr<float>()[i], pn[i], 2e-6) << "step " << step;
  }
  // The zero-gradient, decayed element shrinks only by weight decay.
  EXPECT_LT(ps.all()[0].value.ptr<float>()[2], 0.5f);
  EXPECT_EQ(ps.all()[1].value.ptr<float>()[0], 1.0f);  // excluded from decay, zero gradient
}

TEST(LrSchedule, WarmupCosineWsdConstant) {
  LrSchedule s;
  s.peak = 1.0, s.min = 0.1, s.warmup = 10, s.total = 110;
  EXPECT_DOUBLE_EQ(s.at(0), 0.1);
  EXPECT_DOUBLE_EQ(s.at(9), 1.0);
  EXPECT_DOUBLE_EQ(s.at(10), 1.0);
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  s.kind = LrSchedule::Kind::wsd;
  s.decay = 20;
  EXPECT_DOUBLE_EQ(s.at(89), 1.0);
  EXPECT_NEAR(s.at(90), 1.0 - 0.9 / 20, 1e-12);
  EXPECT_NEAR(s.at(109), 0.1, 1e-12);
  s.kind = LrSchedule::Kind::constant;
  EXPECT_DOUBLE_EQ(s.at(100), 1.0);
  s.warmup = 200;
  EXPECT_THROW(s.validate(), Error);
  LrSchedule::Kind k;
  EXPECT_TRUE(lr_kind_from_name("wsd", &k));
  EXPECT_FALSE(lr_kind_from_name("linear", &k));
}

}  // namespace
}  // namespace braid
