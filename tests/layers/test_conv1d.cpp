// Causal conv1d: f64 gradients against finite differences (with document resets, initial state
// and SiLU), and the split-run property that context parallelism relies on.
#include "layers/causal_conv1d/causal_conv1d.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

struct ConvCase {
  int64_t b, t, c, w;
  bool silu, bias, docs, init;
};

// Sets seq_idx rows to a few documents with boundaries at pseudo-random places.
void make_docs(const Tensor& seq, int64_t every) {
  const int64_t b = seq.size(0), t = seq.size(1);
  for (int64_t i = 0; i < b; ++i) {
    int32_t doc = 0;
    for (int64_t j = 0; j < t; ++j) {
      if (j > 0 && (j * 7 + i * 3) % every == 0) ++doc;
      seq.ptr<int32_t>()[i * t + j] = doc;
    }
  }
}

class Conv1dGrad : public ::testing::TestWithParam<ConvCase> {};

TEST_P(Conv1dGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.b * 1000 + c.t * 10 + c.w);
  Buffers buf;
  Tensor x = buf.make(DType::f64, {c.b, c.t, c.c}, "x"), w = buf.make(DType::f64, {c.c, c.w}, "w");
  Tensor bias = buf.make(DType::f64, {c.c}, "bias"),
         seq = buf.make(DType::i32, {c.b, c.t}, "seq_idx");
  Tensor h0 = buf.make(DType::f64, {c.b, c.c, c.w - 1}, "h0"), hT = buf.like(h0, "hT");
  Tensor y = buf.like(x, "y"), py = buf.like(x, "py"), ph = buf.like(h0, "ph");
  Tensor dx = buf.like(x, "dx"), dw = buf.like(w, "dw"), db = buf.like(bias, "db"),
         dh0 = buf.like(h0, "dh0");
  for (const Tensor* t : {&x, &w, &bias, &h0, &py, &ph}) test::fill_uniform(*t, -1, 1);
  make_docs(seq, 3);
  Conv1dInputs in{
      &x, &w, c.bias ? &bias : nullptr, c.docs ? &seq : nullptr, c.init ? &h0 : nullptr, c.silu};
  auto loss = [&] {
    test::poison(y);
    test::poison(hT);
    causal_conv1d_forward(in, y, &hT);
    return test::weighted_sum(y, py) + test::weighted_sum(hT, ph);
  };
  loss();
  test::poison(dx);
  test::poison(dh0);
  causal_conv1d_backward(in, py, &ph, {&dx, &dw, c.bias ? &db : nullptr, &dh0});
  test::expect_gradient("dx", x, dx, loss);
  test::expect_gradient("dw", w, dw, loss);
  if (c.bias) test::expect_gradient("dbias", bias, db, loss);
  if (c.init) test::expect_gradient("dinitial_state", h0, dh0, loss);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Conv1dGrad,
                         ::testing::Values(ConvCase{1, 1, 1, 2, false, false, false, false},
                                           ConvCase{1, 7, 3, 4, true, true, false, true},
                                           ConvCase{2, 9, 5, 3, true, true, true, true},
                                           ConvCase{2, 2, 4, 4, false, true, true, true},
                                           ConvCase{3, 13, 2, 2, true, false, true, false}));

// Running [0,T1) and then [T1,T) with the state passed equals one run, forward and backward.
TEST(Conv1d, SplitRunEqualsFullRun) {
  test::reseed(99);
  Buffers buf;
  const int64_t b = 2, t = 11, c = 3, w = 4, t1 = 5, t2 = t - t1;
  Tensor x = buf.make(DType::f64, {b, t, c}, "x"), wt = buf.make(DType::f64, {c, w}, "w");
  Tensor bias = buf.make(DType::f64, {c}, "bias"), seq = buf.make(DType::i32, {b, t}, "seq");
  Tensor y = buf.like(x, "y"), dy = buf.like(x, "dy"), dx = buf.like(x, "dx");
  Tensor dw = buf.like(wt, "dw"), db = buf.like(bias, "db");
  for (const Tensor* p : {&x, &wt, &bias, &dy}) test::fill_uniform(*p, -1, 1);
  make_docs(seq, 4);
  causal_conv1d_forward({&x, &wt, &bias, &seq, nullptr, true}, y, nullptr);
  causal_conv1d_backward({&x, &wt, &bias, &seq, nullptr, true}, dy, nullptr,
                         {&dx, &dw, &db, nullptr});
  auto half = [&](const Tensor& full, int64_t start, int64_t len, const std::string& name) {
    return test::time_slice(buf, full, start, len, name);
  };
  Tensor x1 = half(x, 0, t1, "x1"), x2 = half(x, t1, t2, "x2"), s1 = half(seq, 0, t1, "s1"),
         s2 = half(seq, t1, t2, "s2");
  Tensor dy1 = half(dy, 0, t1, "dy1"), dy2 = half(dy, t1, t2, "dy2");
  Tensor y1 = buf.like(x1, "y1"), y2 = buf.like(x2, "y2"),
         st = buf.make(DType::f64, {b, c, w - 1}, "state");
  Tensor dx1 = buf.like(x1, "dx1"), dx2 = buf.like(x2, "dx2"), dst = buf.like(st, "dstate");
  Tensor dw2 = buf.like(wt, "dw2"), db2 = buf.like(bias, "db2");
  causal_conv1d_forward({&x1, &wt, &bias, &s1, nullptr, true}, y1, &st);
  // The state is used by the second half only where its first document continues.
  causal_conv1d_forward({&x2, &wt, &bias, &s2, &st, true}, y2, nullptr);
  causal_conv1d_backward({&x2, &wt, &bias, &s2, &st, true}, dy2, nullptr, {&dx2, &dw2, &db2, &dst});
  causal_conv1d_backward({&x1, &wt, &bias, &s1, nullptr, true}, dy1, &dst,
                         {&dx1, &dw2, &db2, nullptr});
  EXPECT_LE(test::max_violation(y1, half(y, 0, t1, "ya"), 1e-14, 1e-12), 1.0);
  EXPECT_LE(test::max_violation(y2, half(y, t1, t2, "yb"), 1e-14, 1e-12), 1.0);
  EXPECT_LE(test::max_violation(dx1, half(dx, 0, t1, "dxa"), 1e-14, 1e-12), 1.0);
  EXPECT_LE(test::max_violation(dx2, half(dx, t1, t2, "dxb"), 1e-14, 1e-12), 1.0);
  EXPECT_LE(test::max_violation(dw2, dw, 1e-13, 1e-12), 1.0);
  EXPECT_LE(test::max_violation(db2, db, 1e-13, 1e-12), 1.0);
}

TEST(Conv1d, DocumentBoundaryBlocksHistory) {
  Buffers buf;
  Tensor x = buf.make(DType::f64, {1, 4, 1}, "x"), w = buf.make(DType::f64, {1, 2}, "w");
  Tensor seq = buf.make(DType::i32, {1, 4}, "seq"), y = buf.like(x, "y");
  const double xv[4] = {1, 2, 3, 4};
  std::memcpy(x.data, xv, sizeof(xv));
  w.ptr<double>()[0] = 10, w.ptr<double>()[1] = 1;  // y_t = 10 x_{t-1} + x_t
  const int32_t sv[4] = {0, 0, 1, 1};
  std::memcpy(seq.data, sv, sizeof(sv));
  causal_conv1d_forward({&x, &w, nullptr, &seq, nullptr, false}, y, nullptr);
  EXPECT_EQ(test::at(y, 0), 1.0);
  EXPECT_EQ(test::at(y, 1), 12.0);
  EXPECT_EQ(test::at(y, 2), 3.0);  // x_1 belongs to the previous document
  EXPECT_EQ(test::at(y, 3), 34.0);
}

TEST(Conv1d, RejectsWidthOutsideTwoToFour) {
  Buffers buf;
  Tensor x = buf.make(DType::f64, {1, 4, 2}, "x"), w = buf.make(DType::f64, {2, 5}, "w"),
         y = buf.like(x, "y");
  EXPECT_THROW(causal_conv1d_forward({&x, &w, nullptr, nullptr, nullptr, false}, y, nullptr),
               Error);
}

}  // namespace
}  // namespace braid
