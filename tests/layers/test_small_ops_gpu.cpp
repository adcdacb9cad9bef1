// The GPU cross-entropy and elementwise ops against the CPU reference (skipped where no GPU is
// visible), fresh random inputs, outputs poisoned with NaN first.
// Cross-entropy: logits of random scale (bf16 or f32), ignored rows, V not a multiple of the
// block. The GPU sums each row's exponentials in f32 (each thread V/256 terms, then a tree of 8 +
// 8 levels) with __expf (a few ulp), the CPU in f64: the log-sum-exp's error per row is at most
// e_lse = (V/256 + 16) 2^-22 + 2^-20 (log V + scale) (the last term: the f32 rounding of the
// loss). The losses read back and summed must match the f64 reference within 2x the naive f32
// error plus e_lse per counted row; dlogits (written into the logits' own memory) within 2x the
// naive error plus grad_scale e_lse, plus 2^-8 grad_scale for a bf16 output. A target outside the
// vocabulary is an error naming the row.
// Elementwise: add_into (f32 += bf16, bf16 += bf16, f32 += f32) and cast_into are exact up to
// the one rounding of the stored result, which the reference reproduces; neg_exp and its
// backward within 2^-22 relative (expf).
#include <cmath>
#include <random>

#include "layers/cross_entropy/cross_entropy.h"
#include "layers/elementwise/elementwise.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct CeCase {
  int64_t m, v;
  bool bf16;
  double scale;  // logits in [-scale, scale]
};

class GpuCrossEntropy : public GpuTest<CeCase> {};

TEST_P(GpuCrossEntropy, MatchesReference) {
  const CeCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor logits = random_tensor({k.m, k.v}, -k.scale, k.scale, k.bf16, g);
  HostTensor targets{{k.m}, {}};
  for (int64_t i = 0; i < k.m; ++i) targets.v.push_back(i % 7 == 3 ? -1.0 : double(g() % k.v));
  const double scale = 1.0 / double(k.m);
  // Reference (f64) and naive (f32) on the CPU.
  const Tensor l64 = make(logits, DType::f64, Device::cpu, "logits"),
               l32 = make(logits, DType::f32, Device::cpu, "logits"),
               t_cpu = make(targets, DType::i32, Device::cpu, "targets");
  const Tensor d64 = empty({k.m, k.v}, DType::f64, Device::cpu, "dlogits"),
               d32 = empty({k.m, k.v}, DType::f32, Device::cpu, "dlogits");
  const LossSum r64 = cross_entropy(l64, t_cpu, &d64, scale),
                r32 = cross_entropy(l32, t_cpu, &d32, scale);
  // GPU: the gradient overwrites the logits.
  const DType dt = k.bf16 ? DType::bf16 : DType::f32;
  const Tensor lg = make(logits, dt, Device::cuda, "logits"),
               tg = make(targets, DType::i32, Device::cuda, "targets"),
               rows = empty({k.m, 2}, DType::f32, Device::cuda, "row_loss");
  gpu_->fill(rows, std::nan(""), {});
  cross_entropy_rows(lg, tg, &lg, scale, rows);
  const LossSum got = read_row_losses(rows);
  EXPECT_EQ(got.count, r64.count);
  const double e_lse = (double(k.v) / 256 + 16) * std::ldexp(1.0, -22) +
                       std::ldexp(std::log(double(k.v)) + k.scale, -20);
  EXPECT_LE(std::fabs(got.sum - r64.sum), 2 * std::fabs(r32.sum - r64.sum) + r64.count * e_lse)
      << "loss sum " << got.sum << " vs " << r64.sum;
  const std::vector<double> ref = host_values(d64, false), naive = host_values(d32, k.bf16),
                            d = download(lg);
  EXPECT_LE(max_err(d, ref),
            2 * max_err(naive, ref) + scale * e_lse + (k.bf16 ? std::ldexp(scale, -8) : 0.0))
      << "dlogits; naive error " << max_err(naive, ref);
  // Without a gradient: the same losses, the logits untouched.
  const Tensor lg2 = make(logits, dt, Device::cuda, "logits");
  cross_entropy_rows(lg2, tg, nullptr, scale, rows);
  EXPECT_EQ(read_row_losses(rows).sum, got.sum);
  EXPECT_EQ(download(lg2), host_values(make(logits, DType::f32, Device::cpu, "l"), k.bf16));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuCrossEntropy,
                         ::testing::Values(CeCase{1, 7, false, 1.0}, CeCase{37, 320, true, 4.0},
                                           CeCase{200, 1000, true, 20.0},
                                           CeCase{64, 32768, false, 8.0},
                                           CeCase{9, 50257, true, 2.0}));

struct None {};
class GpuSmallOps : public GpuTest<None> {};

TEST_P(GpuSmallOps, BadTargetIsNamed) {
  HostTensor logits{{3, 5}, std::vector<double>(15, 0.5)}, targets{{3}, {1, 5, 0}};
  const Tensor lg = make(logits, DType::f32, Device::cuda, "logits"),
               tg = make(targets, DType::i32, Device::cuda, "targets"),
               rows = empty({3, 2}, DType::f32, Device::cuda, "row_loss");
  cross_entropy_rows(lg, tg, nullptr, 1.0, rows);
  try {
    read_row_losses(rows);
    FAIL() << "a target outside the vocabulary was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 1"), std::string::npos) << e.what();
  }
}

TEST_P(GpuSmallOps, ElementwiseMatchReference) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const int64_t n = 100003;  // not a multiple of the 4-element threads
  const HostTensor a = random_tensor({n}, -3, 3, true, g), b = random_tensor({n}, -3, 3, true, g),
                   c = random_tensor({n}, -3, 3, false, g);
  auto bf = [](double v) { return double(from_bf16(to_bf16(float(v)))); };
  // f32 += bf16
  {
    const Tensor y = make(c, DType::f32, Device::cuda, "y"),
                 x = make(a, DType::bf16, Device::cuda, "x");
    add_into(y, x);
    const std::vector<double> got = download(y);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], double(float(c.v[i]) + float(a.v[i]))) << i;
  }
  // bf16 += bf16
  {
    const Tensor y = make(a, DType::bf16, Device::cuda, "y"),
                 x = make(b, DType::bf16, Device::cuda, "x");
    add_into(y, x);
    const std::vector<double> got = download(y);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], bf(float(a.v[i]) + float(b.v[i]))) << i;
  }
  // cast f32 -> bf16 -> f32
  {
    const Tensor x = make(c, DType::f32, Device::cuda, "x"),
                 h = empty({n}, DType::bf16, Device::cuda, "h"),
                 y = empty({n}, DType::f32, Device::cuda, "y");
    gpu_->fill(h, std::nan(""), {}), gpu_->fill(y, std::nan(""), {});
    cast_into(h, x);
    cast_into(y, h);
    const std::vector<double> got = download(y);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], bf(c.v[i])) << i;
  }
  // neg_exp and its backward (f32)
  {
    const Tensor al = make(c, DType::f32, Device::cuda, "A_log"),
                 A = empty({n}, DType::f32, Device::cuda, "A"),
                 dA = make(a, DType::f32, Device::cuda, "dA"),
                 dal = make(b, DType::f32, Device::cuda, "dA_log");
    gpu_->fill(A, std::nan(""), {});
    neg_exp(al, A);
    neg_exp_backward(A, dA, dal);
    const std::vector<double> ga = download(A), gd = download(dal);
    for (int64_t i = 0; i < n; ++i) {
      const double want = -std::exp(double(float(c.v[i])));
      ASSERT_LE(std::fabs(ga[i] - want), std::ldexp(std::fabs(want), -22)) << i;
      const double wd = double(float(b.v[i])) + double(float(a.v[i])) * want;
      ASSERT_LE(std::fabs(gd[i] - wd), std::ldexp(std::fabs(a.v[i] * want) + std::fabs(wd), -22))
          << i;
    }
  }
  // zero_fill
  {
    const Tensor y = make(c, DType::f32, Device::cuda, "y");
    zero_fill(y);
    for (double v : download(y)) ASSERT_EQ(v, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Ops, GpuSmallOps, ::testing::Values(None{}));

}  // namespace
}  // namespace braid
