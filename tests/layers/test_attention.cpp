// Attention: f64 gradients against finite differences (GQA, documents), equality with running
// each document on its own, and the saved log-sum-exp.
#include <cmath>

#include "layers/attention/attention.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

struct AttnCase {
  int64_t b, t, h, hk, p;
  bool docs;
};

class AttentionGrad : public ::testing::TestWithParam<AttnCase> {};

TEST_P(AttentionGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.t * 17 + c.h * 3 + c.hk);
  Buffers buf;
  Tensor q = buf.make(DType::f64, {c.b, c.t, c.h, c.p}, "q"),
         k = buf.make(DType::f64, {c.b, c.t, c.hk, c.p}, "k");
  Tensor v = buf.like(k, "v"), o = buf.like(q, "o"),
         lse = buf.make(DType::f64, {c.b, c.h, c.t}, "lse");
  Tensor seq = buf.make(DType::i32, {c.b, c.t}, "seq"), po = buf.like(q, "po");
  for (const Tensor* t : {&q, &k, &v, &po}) test::fill_uniform(*t, -1, 1);
  for (int64_t i = 0; i < c.b * c.t; ++i) seq.ptr<int32_t>()[i] = int32_t((i % c.t) / 3);
  const AttentionInputs in{&q, &k, &v, c.docs ? &seq : nullptr, 1.0 / std::sqrt(double(c.p))};
  auto loss = [&] {
    test::poison(o);
    attention_forward(in, o, lse);
    return test::weighted_sum(o, po);
  };
  loss();
  Tensor dq = buf.like(q, "dq"), dk = buf.like(k, "dk"), dv = buf.like(v, "dv");
  for (const Tensor* t : {&dq, &dk, &dv}) test::poison(*t);
  attention_backward(in, o, lse, po, dq, dk, dv);
  test::expect_gradient("dq", q, dq, loss);
  test::expect_gradient("dk", k, dk, loss);
  test::expect_gradient("dv", v, dv, loss);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionGrad,
                         ::testing::Values(AttnCase{1, 1, 1, 1, 2, false},
                                           AttnCase{1, 5, 2, 2, 4, false},
                                           AttnCase{2, 7, 4, 2, 3, true},
                                           AttnCase{1, 9, 3, 1, 4, true},
                                           AttnCase{2, 4, 2, 1, 8, false}));

TEST(Attention, PackedDocumentsEqualSeparateRuns) {
  test::reseed(123);
  Buffers buf;
  const int64_t t = 10, h = 2, p = 4, split = 6;
  Tensor q = buf.make(DType::f64, {1, t, h, p}, "q"), k = buf.like(q, "k"), v = buf.like(q, "v");
  Tensor o = buf.like(q, "o"), lse = buf.make(DType::f64, {1, h, t}, "lse"),
         seq = buf.make(DType::i32, {1, t}, "seq");
  for (const Tensor* x : {&q, &k, &v}) test::fill_uniform(*x, -1, 1);
  for (int64_t i = 0; i < t; ++i) seq.ptr<int32_t>()[i] = i < split ? 0 : 1;
  attention_forward({&q, &k, &v, &seq, 0.5}, o, lse);
  // The second document on its own.
  auto part = [&](const Tensor& f, const char* n) {
    return test::time_slice(buf, f, split, t - split, n);
  };
  Tensor q2 = part(q, "q2"), k2 = part(k, "k2"), v2 = part(v, "v2"), o2 = buf.like(q2, "o2");
  Tensor lse2 = buf.make(DType::f64, {1, h, t - split}, "lse2");
  attention_forward({&q2, &k2, &v2, nullptr, 0.5}, o2, lse2);
  EXPECT_LE(test::max_violation(o2, part(o, "o_doc2"), 1e-14, 1e-12), 1.0);
  // First token of a document attends only to itself: output = its own value, lse = its score.
  for (int64_t j = 0; j < p; ++j)
    EXPECT_NEAR(test::at(o, (split * h) * p + j), test::at(v, (split * h) * p + j), 1e-14);
  double s = 0;
  for (int64_t j = 0; j < p; ++j)
    s += test::at(q, split * h * p + j) * test::at(k, split * h * p + j);
  EXPECT_NEAR(test::at(lse, split), 0.5 * s, 1e-14);
}

TEST(Attention, RejectsHeadsNotDivisibleByKvHeads) {
  Buffers buf;
  Tensor q = buf.make(DType::f64, {1, 2, 3, 4}, "q"), k = buf.make(DType::f64, {1, 2, 2, 4}, "k");
  Tensor o = buf.like(q, "o"), lse = buf.make(DType::f64, {1, 3, 2}, "lse");
  EXPECT_THROW(attention_forward({&q, &k, &k, nullptr, 1.0}, o, lse), Error);
}

}  // namespace
}  // namespace braid
