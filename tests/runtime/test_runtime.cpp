// Runtime: dtype conversions, tensor views, arenas (planned memory, no allocation after set-up),
// Philox known-answer vectors and the distribution of its normals.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "runtime/arena.h"
#include "runtime/backend.h"
#include "runtime/dtype.h"
#include "runtime/philox.h"
#include "runtime/tensor.h"

namespace braid {
namespace {

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(1.0f).bits, 0x3f80);
  // 1 + 2^-8 is exactly half-way between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(to_bf16(1.0f + std::ldexp(1.0f, -8)).bits, 0x3f80);
  // 1 + 3 * 2^-8 is half-way between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  EXPECT_EQ(to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)).bits, 0x3f82);
  EXPECT_EQ(to_bf16(1.0f + 5 * std::ldexp(1.0f, -9)).bits, 0x3f81);  // above half: up
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(from_bf16(to_bf16(std::numeric_limits<float>::infinity()))));
  EXPECT_EQ(from_bf16(to_bf16(-2.5f)), -2.5f);
}

TEST(DType, F16MatchesCompilerConversionEverywhere) {
#if defined(__FLT16_MAX__)
  // Every 4099th float bit pattern, covering normals, subnormals, overflow, inf and NaN.
  for (uint64_t u = 0; u <= 0xffffffffull; u += 4099) {
    const float f = bits_float(static_cast<uint32_t>(u));
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    const uint16_t got = to_f16(f).bits;
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(from_f16(f16{got})));
      continue;
    }
    ASSERT_EQ(got, want) << "float bits 0x" << std::hex << u;
    ASSERT_EQ(from_f16(f16{got}), static_cast<float>(h));
  }
#else
  GTEST_SKIP() << "compiler has no _Float16 to compare with";
#endif
}

TEST(DType, NamesRoundTrip) {
  for (DType t :
       {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8}) {
    DType back;
    ASSERT_TRUE(dtype_from_name(dtype_name(t), &back));
    EXPECT_EQ(back, t);
  }
  DType x;
  EXPECT_FALSE(dtype_from_name("f8", &x));
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
}

TEST(Tensor, ViewsSlicesAndShapeChecks) {
  std::vector<float> mem(24);
  Tensor t = Tensor::contiguous_view(mem.data(), DType::f32, Device::cpu, {2, 3, 4}, "t");
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.stride[0], 12);
  EXPECT_TRUE(t.is_contiguous());
  Tensor s = t.slice(1, 1, 2);
  EXPECT_EQ(s.size(1), 2);
  EXPECT_FALSE(s.is_contiguous());
  EXPECT_EQ(static_cast<float*>(s.data), mem.data() + 4);
  Tensor r = t.reshape({6, 4});
  EXPECT_EQ(r.size(-1), 4);
  EXPECT_THROW(t.reshape({5, 5}), Error);
  EXPECT_THROW(s.reshape({8}), Error);
  EXPECT_THROW(t.slice(2, 3, 2), Error);
  EXPECT_THROW(t.ptr<double>(), Error);
  EXPECT_THROW(check_shape(t, {2, 3, 5}), Error);
  EXPECT_EQ(t.describe(), "t[2,3,4]:f32@cpu");
}

TEST(Arena, MeasuringPlanMatchesRealArenaAndStepAllocatesNothing) {
  auto backend = make_cpu_backend();
  auto setup = [](Arena& a) {
    Tensor x = a.take("x", DType::f32, {10, 3});
    Tensor y = a.take("y", DType::bf16, {7});
    const size_t m = a.mark();
    a.take("scratch", DType::f64, {100});
    a.reset(m);
    a.take("z", DType::i32, {5});
    return std::pair{x, y};
  };
  Arena plan = Arena::measuring("plan", Device::cpu);
  setup(plan);
  EXPECT_EQ(plan.high_water(), 256u + 256u + 1024u);  // x, y, then the scratch peak
  Arena real = Arena::allocate("real", *backend, plan.high_water());
  const int64_t before = backend->allocation_count();
  auto [x, y] = setup(real);
  EXPECT_EQ(backend->allocation_count(), before);
  EXPECT_EQ(static_cast<char*>(y.data) - static_cast<char*>(x.data), 256);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.data) % Arena::kAlign, 0u);
  EXPECT_THROW(real.take("too_big", DType::f32, {1000}), Error);
}

TEST(Backend, CpuFillCopyAndRandom) {
  auto be = make_cpu_backend();
  std::vector<float> a(10), b(10);
  Tensor ta = Tensor::contiguous_view(a.data(), DType::f32, Device::cpu, {10}, "a");
  Tensor tb = Tensor::contiguous_view(b.data(), DType::f32, Device::cpu, {10}, "b");
  be->fill(ta, 2.5, {});
  copy_tensor(*be, tb, ta);
  EXPECT_EQ(b[9], 2.5f);
  RandomSpec spec{RandomSpec::Kind::uniform, 7, 3, -1.0f, 1.0f};
  be->fill_random(ta, spec, {});
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(a[i], random_value(spec, i));
    EXPECT_GE(a[i], -1.0f);
    EXPECT_LT(a[i], 1.0f);
  }
}

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
TEST(Philox, KnownAnswerVectors) {
  const philox::U32x4 z = philox::philox4x32_10({{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(z.v[0], 0x6627e8d5u);
  EXPECT_EQ(z.v[1], 0xe169c58du);
  EXPECT_EQ(z.v[2], 0xbc57ac4cu);
  EXPECT_EQ(z.v[3], 0x9b00dbd8u);
  const philox::U32x4 f = philox::philox4x32_10(
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(f.v[0], 0x408f276du);
  EXPECT_EQ(f.v[1], 0x41c83b0eu);
  EXPECT_EQ(f.v[2], 0xa20bc7c6u);
  EXPECT_EQ(f.v[3], 0x6d5451fdu);
  const philox::U32x4 p = philox::philox4x32_10(
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(p.v[0], 0xd16cfe09u);
  EXPECT_EQ(p.v[1], 0x94fdccebu);
  EXPECT_EQ(p.v[2], 0x5001e420u);
  EXPECT_EQ(p.v[3], 0x24126ea1u);
}

TEST(Philox, LogAndInverseCdfAccuracy) {
  for (double x : {1e-300, 1e-7, 0.001, 0.3, 0.7071067811865475, 0.7071067811865476, 0.9999, 1.0,
                   1.4142135623730951, 3.0}) {
    EXPECT_NEAR(philox::log_rn(x), std::log(x), 1e-12 * std::max(1.0, std::abs(std::log(x)))) << x;
  }
  // Acklam's approximation has relative error 1.2e-9; the float result adds half an ulp (3e-8).
  EXPECT_NEAR(philox::inverse_normal_cdf(0.975), 1.959963984540054, 1e-7);
  EXPECT_EQ(philox::inverse_normal_cdf(0.5), 0.0f);
  EXPECT_NEAR(philox::inverse_normal_cdf(0.001), -3.090232306167813, 2e-7);
  EXPECT_NEAR(philox::inverse_normal_cdf(0.999), 3.090232306167813, 2e-7);
  EXPECT_NEAR(philox::inverse_normal_cdf(1e-9), -5.997807015007686, 1e-6);
}

TEST(Philox, NormalsHaveUnitMomentsAndDependOnTensorId) {
  const int n = 400000;
  double s = 0, s2 = 0, s4 = 0;
  int differ = 0;
  for (int i = 0; i < n; ++i) {
    const double z = philox::normal(1234, 5, i);
    s += z, s2 += z * z, s4 += z * z * z * z;
    differ += philox::normal(1234, 6, i) != z;
  }
  // Standard errors: mean 1/sqrt(n) = 0.0016, variance sqrt(2/n) = 0.0022, kurtosis ~ 0.01.
  EXPECT_NEAR(s / n, 0.0, 0.008);
  EXPECT_NEAR(s2 / n, 1.0, 0.011);
  EXPECT_NEAR(s4 / n, 3.0, 0.06);
  EXPECT_GT(differ, n - 10);
  EXPECT_EQ(philox::normal(1234, 5, 77), philox::normal(1234, 5, 77));
}

}  // namespace
}  // namespace braid
