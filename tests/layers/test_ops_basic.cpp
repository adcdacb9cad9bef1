// Gradient tests (f64 finite differences) and direct checks for the small ops.
#include <cmath>

#include "layers/cross_entropy/cross_entropy.h"
#include "layers/elementwise/elementwise.h"
#include "layers/embedding/embedding.h"
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "layers/linear/linear.h"
#include "layers/rmsnorm/rmsnorm.h"
#include "layers/rope/rope.h"
#include "layers/swiglu/swiglu.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;
using test::expect_gradient;
using test::fill_uniform;
using test::weighted_sum;

struct LinearCase {
  int64_t m, in, out;
  bool bias;
};
class LinearGrad : public ::testing::TestWithParam<LinearCase> {};

TEST_P(LinearGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.m * 131 + c.in * 7 + c.out);
  Buffers buf;
  Tensor x = buf.make(DType::f64, {c.m, c.in}, "x"), w = buf.make(DType::f64, {c.out, c.in}, "w");
  Tensor b = buf.make(DType::f64, {c.out}, "b"), y = buf.make(DType::f64, {c.m, c.out}, "y");
  Tensor probe = buf.like(y, "probe"), dx = buf.like(x, "dx"), dw = buf.like(w, "dw"),
         db = buf.like(b, "db");
  for (const Tensor* t : {&x, &w, &b, &probe}) fill_uniform(*t, -1, 1);
  const Tensor* bias = c.bias ? &b : nullptr;
  auto loss = [&] {
    test::poison(y);
    linear_forward(x, w, bias, y);
    return weighted_sum(y, probe);
  };
  loss();
  test::poison(dx);
  linear_backward(x, w, probe, &dx, dw, c.bias ? &db : nullptr);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dw", w, dw, loss);
  if (c.bias) expect_gradient("db", b, db, loss);
  // Parameter gradients accumulate: a second backward doubles them.
  Tensor dw2 = buf.like(dw, "dw2");
  std::memcpy(dw2.data, dw.data, dw.nbytes());
  linear_backward(x, w, probe, nullptr, dw2, nullptr);
  for (int64_t i = 0; i < dw.numel(); ++i)
    ASSERT_NEAR(test::at(dw2, i), 2 * test::at(dw, i), 1e-13 * (1 + std::abs(test::at(dw, i))));
}
INSTANTIATE_TEST_SUITE_P(Shapes, LinearGrad,
                         ::testing::Values(LinearCase{1, 1, 1, true}, LinearCase{3, 5, 7, true},
                                           LinearCase{17, 33, 9, false},
                                           LinearCase{8, 64, 12, true}));

TEST(Linear, Float32MatchesFloat64) {
  test::reseed(5);
  Buffers buf;
  const int64_t m = 37, in = 70, out = 45;
  Tensor x = buf.make(DType::f64, {m, in}, "x"), w = buf.make(DType::f64, {out, in}, "w");
  Tensor y = buf.make(DType::f64, {m, out}, "y");
  fill_uniform(x, -1, 1);
  fill_uniform(w, -1, 1);
  Tensor xf = buf.make(DType::f32, {m, in}, "xf"), wf = buf.make(DType::f32, {out, in}, "wf");
  Tensor yf = buf.make(DType::f32, {m, out}, "yf");
  for (int64_t i = 0; i < x.numel(); ++i) test::set(xf, i, test::at(x, i));
  for (int64_t i = 0; i < w.numel(); ++i) test::set(wf, i, test::at(w, i));
  linear_forward(x, w, nullptr, y);
  linear_forward(xf, wf, nullptr, yf);
  // f32 dot products of length 70 with |terms| <= 1: error <= 70 * 2^-24 * sum|terms| ~ 3e-4 worst
  // case; the rounded inputs add 2^-24 relative per factor. 1e-4 absolute is a bound with margin
  // for random signs (observed ~1e-6).
  EXPECT_LE(test::max_violation(yf, y, 1e-4, 0), 1.0);
}

TEST(Embedding, GradientAndBadTokens) {
  test::reseed(11);
  Buffers buf;
  Tensor tok = buf.make(DType::i32, {2, 5}, "tok"), w = buf.make(DType::f64, {7, 4}, "w");
  Tensor y = buf.make(DType::f64, {2, 5, 4}, "y"), probe = buf.like(y, "probe"),
         dw = buf.like(w, "dw");
  const int32_t ids[10] = {0, 3, 3, 6, 1, 2, 3, 0, 5, 5};
  std::memcpy(tok.data, ids, sizeof(ids));
  fill_uniform(w, -1, 1);
  fill_uniform(probe, -1, 1);
  auto loss = [&] {
    embedding_forward(tok, w, y);
    return weighted_sum(y, probe);
  };
  loss();
  embedding_backward(tok, probe, dw);
  expect_gradient("dW", w, dw, loss);
  tok.ptr<int32_t>()[4] = 7;
  EXPECT_THROW(embedding_forward(tok, w, y), Error);
}

class RmsNormGrad : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};
TEST_P(RmsNormGrad, MatchesFiniteDifferences) {
  const auto [m, d] = GetParam();
  test::reseed(m * 31 + d);
  Buffers buf;
  Tensor x = buf.make(DType::f64, {m, d}, "x"), w = buf.make(DType::f64, {d}, "w");
  Tensor y = buf.like(x, "y"), r = buf.make(DType::f64, {m}, "rstd"), probe = buf.like(x, "probe");
  Tensor dx = buf.like(x, "dx"), dw = buf.like(w, "dw");
  fill_uniform(x, -2, 2);
  fill_uniform(w, 0.5, 1.5);
  fill_uniform(probe, -1, 1);
  auto loss = [&] {
    rmsnorm_forward(x, w, 1e-5, y, r);
    return weighted_sum(y, probe);
  };
  loss();
  test::poison(dx);
  rmsnorm_backward(x, w, r, probe, dx, dw);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dw", w, dw, loss);
}
INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormGrad,
                         ::testing::Values(std::pair<int64_t, int64_t>{1, 1},
                                           std::pair<int64_t, int64_t>{3, 8},
                                           std::pair<int64_t, int64_t>{5, 33}));

TEST(RmsNorm, MatchesDefinition) {
  Buffers buf;
  Tensor x = buf.make(DType::f64, {1, 2}, "x"), w = buf.make(DType::f64, {2}, "w");
  Tensor y = buf.like(x, "y"), r = buf.make(DType::f64, {1}, "r");
  x.ptr<double>()[0] = 3, x.ptr<double>()[1] = 4, w.ptr<double>()[0] = 1, w.ptr<double>()[1] = 2;
  rmsnorm_forward(x, w, 0.0, y, r);
  const double rms = std::sqrt((9.0 + 16.0) / 2);
  EXPECT_NEAR(y.ptr<double>()[0], 3 / rms, 1e-15);
  EXPECT_NEAR(y.ptr<double>()[1], 8 / rms, 1e-15);
}

struct GatedCase {
  int64_t m, d, g;
};
class GatedRmsNormGrad : public ::testing::TestWithParam<GatedCase> {};
TEST_P(GatedRmsNormGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.m * 17 + c.d + c.g);
  Buffers buf;
  Tensor x = buf.make(DType::f64, {c.m, c.d}, "x"), z = buf.like(x, "z"),
         w = buf.make(DType::f64, {c.d}, "w");
  Tensor y = buf.like(x, "y"), r = buf.make(DType::f64, {c.m, c.g}, "rstd"),
         probe = buf.like(x, "probe");
  Tensor dx = buf.like(x, "dx"), dz = buf.like(x, "dz"), dw = buf.like(w, "dw");
  for (const Tensor* t : {&x, &z, &probe}) fill_uniform(*t, -2, 2);
  fill_uniform(w, 0.5, 1.5);
  auto loss = [&] {
    gated_rmsnorm_forward(x, z, w, c.g, 1e-5, y, r);
    return weighted_sum(y, probe);
  };
  loss();
  test::poison(dx);
  test::poison(dz);
  gated_rmsnorm_backward(x, z, w, c.g, r, probe, dx, dz, dw);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dz", z, dz, loss);
  expect_gradient("dw", w, dw, loss);
}
INSTANTIATE_TEST_SUITE_P(Shapes, GatedRmsNormGrad,
                         ::testing::Values(GatedCase{1, 4, 1}, GatedCase{3, 12, 3},
                                           GatedCase{4, 16, 2}));

TEST(GatedRmsNorm, RejectsGroupsThatDoNotDivide) {
  Buffers buf;
  Tensor x = buf.make(DType::f64, {2, 6}, "x"), w = buf.make(DType::f64, {6}, "w");
  Tensor r = buf.make(DType::f64, {2, 4}, "r");
  EXPECT_THROW(gated_rmsnorm_forward(x, x, w, 4, 1e-5, x, r), Error);
}

TEST(SwiGlu, MatchesFiniteDifferences) {
  test::reseed(3);
  Buffers buf;
  Tensor a = buf.make(DType::f64, {4, 9}, "a"), b = buf.like(a, "b"), y = buf.like(a, "y");
  Tensor probe = buf.like(a, "probe"), da = buf.like(a, "da"), db = buf.like(a, "db");
  for (const Tensor* t : {&a, &b, &probe}) fill_uniform(*t, -3, 3);
  auto loss = [&] {
    swiglu_forward(a, b, y);
    return weighted_sum(y, probe);
  };
  loss();
  swiglu_backward(a, b, probe, da, db);
  expect_gradient("da", a, da, loss);
  expect_gradient("db", b, db, loss);
}

TEST(CrossEntropy, GradientIgnoredRowsAndBadTargets) {
  test::reseed(4);
  Buffers buf;
  const int64_t m = 6, v = 11;
  Tensor logits = buf.make(DType::f64, {m, v}, "logits"), dl = buf.like(logits, "dlogits");
  Tensor tgt = buf.make(DType::i32, {m}, "targets");
  fill_uniform(logits, -3, 3);
  const int32_t t[m] = {0, 10, -1, 4, 4, 7};
  std::memcpy(tgt.data, t, sizeof(t));
  auto loss = [&] { return cross_entropy(logits, tgt, nullptr, 0).sum; };
  const LossSum ls = cross_entropy(logits, tgt, &dl, 1.0);
  EXPECT_EQ(ls.count, 5);
  expect_gradient("dlogits", logits, dl, loss);
  for (int64_t j = 0; j < v; ++j) EXPECT_EQ(test::at(dl, 2 * v + j), 0.0);
  // Uniform logits give log(V).
  Tensor flat = buf.like(logits, "flat");
  test::zero(flat);
  EXPECT_NEAR(cross_entropy(flat, tgt, nullptr, 0).sum / 5, std::log(double(v)), 1e-12);
  tgt.ptr<int32_t>()[0] = int32_t(v);
  EXPECT_THROW(cross_entropy(logits, tgt, nullptr, 0), Error);
}

TEST(Rope, GradientAndInverse) {
  test::reseed(8);
  Buffers buf;
  Tensor x = buf.make(DType::f64, {2, 5, 3, 8}, "x"), y = buf.like(x, "y"),
         probe = buf.like(x, "probe");
  Tensor dx = buf.like(x, "dx"), back = buf.like(x, "back"),
         pos = buf.make(DType::i32, {2, 5}, "pos");
  for (int64_t i = 0; i < 10; ++i) pos.ptr<int32_t>()[i] = int32_t((i * 7) % 5);
  fill_uniform(x, -1, 1);
  fill_uniform(probe, -1, 1);
  auto loss = [&] {
    rope_forward(x, pos, 10000.0, y);
    return weighted_sum(y, probe);
  };
  loss();
  rope_backward(probe, pos, 10000.0, dx);
  expect_gradient("dx", x, dx, loss);
  loss();
  rope_backward(y, pos, 10000.0, back);  // rotation is orthogonal: backward inverts forward
  EXPECT_LE(test::max_violation(back, x, 1e-14, 0), 1.0);
  // Position 0 is the identity.
  for (int64_t i = 0; i < 10; ++i) pos.ptr<int32_t>()[i] = 0;
  rope_forward(x, pos, 10000.0, y);
  for (int64_t i = 0; i < x.numel(); ++i) EXPECT_EQ(test::at(y, i), test::at(x, i));
}

TEST(Elementwise, NegExpAndAdd) {
  Buffers buf;
  Tensor l = buf.make(DType::f64, {3}, "A_log"), a = buf.like(l, "A"), da = buf.like(l, "dA"),
         dl = buf.like(l, "dA_log");
  test::reseed(2);
  fill_uniform(l, -1, 1);
  fill_uniform(da, -1, 1);
  test::zero(dl);
  neg_exp(l, a);
  for (int64_t i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(test::at(a, i), -std::exp(test::at(l, i)));
  auto loss = [&] {
    neg_exp(l, a);
    return weighted_sum(a, da);
  };
  neg_exp_backward(a, da, dl);
  expect_gradient("dA_log", l, dl, loss);
  Tensor s = buf.like(l, "s");
  test::zero(s);
  add_into(s, a);
  add_into(s, a);
  for (int64_t i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(test::at(s, i), 2 * test::at(a, i));
}

}  // namespace
}  // namespace braid
