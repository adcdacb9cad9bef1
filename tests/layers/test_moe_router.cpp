// MoE router: gradients of top-k weights, aux loss and z-loss against finite differences (softmax
// and sigmoid, normalised or not), capacity dropping, and bias-steered choice.
#include <cmath>

#include "layers/moe_router/moe_router.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

struct RouterCase {
  int64_t m, e, k;
  RouterScore score;
  bool normalize;
  double capacity;
};

class RouterGrad : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.m * 11 + c.e * 3 + c.k + int(c.score) * 1000 + c.normalize);
  Buffers buf;
  Tensor logits = buf.make(DType::f64, {c.m, c.e}, "logits"), scores = buf.like(logits, "scores");
  Tensor ex = buf.make(DType::i32, {c.m, c.k}, "expert"), slot = buf.like(ex, "slot");
  Tensor w = buf.make(DType::f64, {c.m, c.k}, "weight"),
         cnt = buf.make(DType::i32, {c.e}, "counts");
  Tensor pw = buf.like(w, "pw"), dl = buf.like(logits, "dlogits");
  test::fill_uniform(logits, -2, 2);
  test::fill_uniform(pw, -1, 1);
  const RouterConfig cfg{c.k, c.score, c.normalize, c.capacity};
  const RouterOutputs out{&scores, &ex, &slot, &w, &cnt};
  const double aux_c = 0.7, z_c = 0.3;
  // Finite differences hold the routing (a discrete choice) fixed at the unperturbed one; a step
  // of 1e-6 does not change the top-k for these continuous random logits.
  auto loss = [&] {
    const RouterLosses ls = router_forward(logits, nullptr, cfg, out);
    return test::weighted_sum(w, pw) + aux_c * ls.aux + z_c * ls.z;
  };
  loss();
  router_backward(logits, cfg, out, pw, aux_c, z_c, dl);
  test::expect_gradient("dlogits", logits, dl, loss, 1e-6, 256);
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterGrad,
                         ::testing::Values(RouterCase{6, 4, 2, RouterScore::softmax, false, 0},
                                           RouterCase{6, 4, 2, RouterScore::softmax, true, 0},
                                           RouterCase{5, 8, 3, RouterScore::sigmoid, true, 0},
                                           RouterCase{7, 3, 1, RouterScore::sigmoid, false, 0},
                                           RouterCase{9, 4, 2, RouterScore::softmax, false, 1.0}));

TEST(Router, CapacityDropsLaterAssignmentsInOrder) {
  Buffers buf;
  const int64_t m = 4, e = 2;
  Tensor logits = buf.make(DType::f64, {m, e}, "logits"), scores = buf.like(logits, "scores");
  Tensor ex = buf.make(DType::i32, {m, 1}, "expert"), slot = buf.like(ex, "slot");
  Tensor w = buf.make(DType::f64, {m, 1}, "w"), cnt = buf.make(DType::i32, {e}, "counts");
  for (int64_t i = 0; i < m; ++i)
    logits.ptr<double>()[i * e] = 1, logits.ptr<double>()[i * e + 1] = 0;
  const RouterConfig cfg{1, RouterScore::softmax, false, 1.0};  // cap = ceil(4 * 1 / 2) = 2
  EXPECT_EQ(router_capacity(cfg, m, e), 2);
  router_forward(logits, nullptr, cfg, {&scores, &ex, &slot, &w, &cnt});
  const int32_t* s = slot.ptr<int32_t>();
  EXPECT_EQ(s[0], 0);
  EXPECT_EQ(s[1], 1);
  EXPECT_EQ(s[2], -1);
  EXPECT_EQ(s[3], -1);
  EXPECT_EQ(cnt.ptr<int32_t>()[0], 4);
  // Dropless keeps all.
  router_forward(logits, nullptr, {1, RouterScore::softmax, false, 0.0},
                 {&scores, &ex, &slot, &w, &cnt});
  EXPECT_EQ(slot.ptr<int32_t>()[3], 3);
}

TEST(Router, BiasSteersChoiceButNotWeights) {
  Buffers buf;
  Tensor logits = buf.make(DType::f64, {1, 3}, "logits"), scores = buf.like(logits, "scores");
  Tensor ex = buf.make(DType::i32, {1, 1}, "expert"), slot = buf.like(ex, "slot");
  Tensor w = buf.make(DType::f64, {1, 1}, "w"), cnt = buf.make(DType::i32, {3}, "counts");
  Tensor bias = buf.make(DType::f64, {3}, "bias");
  const double l[3] = {2.0, 1.0, 0.0}, b[3] = {0.0, 0.5, 0.0};
  std::memcpy(logits.data, l, sizeof(l));
  std::memcpy(bias.data, b, sizeof(b));
  router_forward(logits, &bias, {1, RouterScore::sigmoid, false, 0.0},
                 {&scores, &ex, &slot, &w, &cnt});
  EXPECT_EQ(ex.ptr<int32_t>()[0], 1);  // sigmoid(1) + 0.5 > sigmoid(2)
  EXPECT_NEAR(test::at(w, 0), 1 / (1 + std::exp(-1.0)), 1e-15);
}

TEST(Router, BalancedRoutingGivesUnitAuxLoss) {
  Buffers buf;
  const int64_t m = 4, e = 4, k = 1;
  Tensor logits = buf.make(DType::f64, {m, e}, "logits"), scores = buf.like(logits, "scores");
  Tensor ex = buf.make(DType::i32, {m, k}, "expert"), slot = buf.like(ex, "slot");
  Tensor w = buf.make(DType::f64, {m, k}, "w"), cnt = buf.make(DType::i32, {e}, "counts");
  test::zero(logits);
  for (int64_t i = 0; i < m; ++i) logits.ptr<double>()[i * e + i] = 1e-9;  // token i -> expert i
  const RouterLosses ls = router_forward(logits, nullptr, {k, RouterScore::softmax, false, 0},
                                         {&scores, &ex, &slot, &w, &cnt});
  EXPECT_NEAR(ls.aux, 1.0, 1e-8);
  EXPECT_NEAR(ls.z, std::log(4.0) * std::log(4.0), 1e-8);
}

}  // namespace
}  // namespace braid
