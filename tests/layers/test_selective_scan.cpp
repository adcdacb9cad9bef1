// Mamba-1 selective scan: f64 gradients of every input against finite differences, the split-run
// property (state passed between halves, forward and backward), and document resets.
#include "layers/selective_scan/selective_scan.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

struct ScanCase {
  int64_t b, t, c, n, g;
  bool z, softplus, docs, init;
};

struct ScanData {
  Tensor u, delta, A, Bm, Cm, D, z, bias, seq, h0;
};

ScanData make_scan(Buffers& buf, const ScanCase& c) {
  ScanData d;
  d.u = buf.make(DType::f64, {c.b, c.t, c.c}, "u");
  d.delta = buf.like(d.u, "delta");
  d.z = buf.like(d.u, "z");
  d.A = buf.make(DType::f64, {c.c, c.n}, "A");
  d.Bm = buf.make(DType::f64, {c.b, c.t, c.g, c.n}, "B");
  d.Cm = buf.like(d.Bm, "C");
  d.D = buf.make(DType::f64, {c.c}, "D");
  d.bias = buf.like(d.D, "delta_bias");
  d.seq = buf.make(DType::i32, {c.b, c.t}, "seq_idx");
  d.h0 = buf.make(DType::f64, {c.b, c.c, c.n}, "h0");
  test::fill_uniform(d.u, -1, 1);
  test::fill_uniform(d.delta, -1, 0.5);
  test::fill_uniform(d.z, -2, 2);
  test::fill_uniform(d.A, -2, -0.2);
  test::fill_uniform(d.Bm, -1, 1);
  test::fill_uniform(d.Cm, -1, 1);
  test::fill_uniform(d.D, -1, 1);
  test::fill_uniform(d.bias, -1, 0.5);
  test::fill_uniform(d.h0, -1, 1);
  for (int64_t i = 0; i < c.b; ++i)
    for (int64_t j = 0, doc = 0; j < c.t; ++j) {
      if (j > 0 && (j * 5 + i) % 4 == 0) ++doc;
      d.seq.ptr<int32_t>()[i * c.t + j] = int32_t(doc);
    }
  return d;
}

ScanInputs inputs(const ScanData& d, const ScanCase& c) {
  ScanInputs in{&d.u,
                &d.delta,
                &d.A,
                &d.Bm,
                &d.Cm,
                &d.D,
                c.z ? &d.z : nullptr,
                &d.bias,
                c.docs ? &d.seq : nullptr,
                c.init ? &d.h0 : nullptr,
                c.softplus};
  return in;
}

class ScanGrad : public ::testing::TestWithParam<ScanCase> {};

TEST_P(ScanGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.b * 7919 + c.t * 31 + c.c * 7 + c.n + c.g);
  Buffers buf;
  ScanData d = make_scan(buf, c);
  const ScanInputs in = inputs(d, c);
  Tensor y = buf.like(d.u, "y"), py = buf.like(d.u, "py"), hT = buf.like(d.h0, "hT"),
         ph = buf.like(d.h0, "ph");
  test::fill_uniform(py, -1, 1);
  test::fill_uniform(ph, -1, 1);
  auto loss = [&] {
    test::poison(y);
    test::poison(hT);
    selective_scan_forward(in, y, &hT);
    return test::weighted_sum(y, py) + test::weighted_sum(hT, ph);
  };
  loss();
  Tensor du = buf.like(d.u, "du"), ddelta = buf.like(d.u, "ddelta"), dz = buf.like(d.u, "dz");
  Tensor dA = buf.like(d.A, "dA"), dB = buf.like(d.Bm, "dB"), dC = buf.like(d.Cm, "dC");
  Tensor dD = buf.like(d.D, "dD"), dbias = buf.like(d.bias, "dbias"), dh0 = buf.like(d.h0, "dh0");
  Tensor ws = buf.make(DType::f64, {selective_scan_workspace_elems(in)}, "workspace");
  for (const Tensor* t : {&du, &ddelta, &dz, &dB, &dC, &dh0}) test::poison(*t);
  selective_scan_backward(in, py, &ph, {&du, &ddelta, &dA, &dB, &dC, &dD, &dz, &dbias, &dh0}, ws);
  test::expect_gradient("du", d.u, du, loss);
  test::expect_gradient("ddelta", d.delta, ddelta, loss);
  test::expect_gradient("dA", d.A, dA, loss);
  test::expect_gradient("dB", d.Bm, dB, loss);
  test::expect_gradient("dC", d.Cm, dC, loss);
  test::expect_gradient("dD", d.D, dD, loss);
  test::expect_gradient("ddelta_bias", d.bias, dbias, loss);
  if (c.z) test::expect_gradient("dz", d.z, dz, loss);
  if (c.init) test::expect_gradient("dinitial_state", d.h0, dh0, loss);
}

INSTANTIATE_TEST_SUITE_P(Shapes, ScanGrad,
                         ::testing::Values(ScanCase{1, 1, 1, 1, 1, false, true, false, false},
                                           ScanCase{1, 6, 4, 3, 1, true, true, false, true},
                                           ScanCase{2, 9, 4, 4, 2, true, true, true, true},
                                           ScanCase{2, 5, 6, 2, 3, false, false, true, false},
                                           ScanCase{1, 17, 2, 16, 1, true, true, true, true}));

TEST(SelectiveScan, SplitRunEqualsFullRun) {
  const ScanCase c{2, 12, 4, 3, 2, true, true, true, true};
  test::reseed(42);
  Buffers buf;
  ScanData d = make_scan(buf, c);
  const ScanInputs in = inputs(d, c);
  Tensor y = buf.like(d.u, "y"), dy = buf.like(d.u, "dy");
  test::fill_uniform(dy, -1, 1);
  selective_scan_forward(in, y, nullptr);
  Tensor ws = buf.make(DType::f64, {selective_scan_workspace_elems(in)}, "ws");
  Tensor du = buf.like(d.u, "du"), ddelta = buf.like(d.u, "ddelta"), dz = buf.like(d.u, "dz");
  Tensor dA = buf.like(d.A, "dA"), dB = buf.like(d.Bm, "dB"), dC = buf.like(d.Cm, "dC");
  Tensor dD = buf.like(d.D, "dD"), dbias = buf.like(d.bias, "dbias"), dh0 = buf.like(d.h0, "dh0");
  for (const Tensor* t : {&dA, &dD, &dbias}) test::zero(*t);
  selective_scan_backward(in, dy, nullptr, {&du, &ddelta, &dA, &dB, &dC, &dD, &dz, &dbias, &dh0},
                          ws);

  const int64_t t1 = 7, t2 = c.t - t1;
  auto part = [&](const Tensor& full, int64_t s, int64_t l, const char* n) {
    return test::time_slice(buf, full, s, l, n);
  };
  ScanData h1 = d, h2 = d;
  for (auto [dst, s, l] : {std::tuple{&h1, int64_t(0), t1}, std::tuple{&h2, t1, t2}}) {
    dst->u = part(d.u, s, l, "u"), dst->delta = part(d.delta, s, l, "delta"),
    dst->z = part(d.z, s, l, "z");
    dst->Bm = part(d.Bm, s, l, "B"), dst->Cm = part(d.Cm, s, l, "C"),
    dst->seq = part(d.seq, s, l, "seq");
  }
  Tensor mid = buf.like(d.h0, "mid"), dmid = buf.like(d.h0, "dmid");
  ScanInputs in1 = inputs(h1, {c.b, t1, c.c, c.n, c.g, true, true, true, true});
  ScanInputs in2 = inputs(h2, {c.b, t2, c.c, c.n, c.g, true, true, true, true});
  in2.initial_state = &mid;
  // The second half's first document continues the first half's last one only in some rows;
  // where it does not, the state passed must be zero (as the rank owning it would send).
  Tensor y1 = buf.like(h1.u, "y1"), y2 = buf.like(h2.u, "y2");
  selective_scan_forward(in1, y1, &mid);
  for (int64_t b = 0; b < c.b; ++b)
    if (d.seq.ptr<int32_t>()[b * c.t + t1] != d.seq.ptr<int32_t>()[b * c.t + t1 - 1])
      for (int64_t i = 0; i < c.c * c.n; ++i) mid.ptr<double>()[b * c.c * c.n + i] = 0;
  selective_scan_forward(in2, y2, nullptr);
  EXPECT_LE(test::max_violation(y1, part(y, 0, t1, "ya"), 1e-13, 1e-11), 1.0);
  EXPECT_LE(test::max_violation(y2, part(y, t1, t2, "yb"), 1e-13, 1e-11), 1.0);

  Tensor du1 = buf.like(h1.u, "du1"), ddelta1 = buf.like(h1.u, "dd1"), dz1 = buf.like(h1.u, "dz1");
  Tensor du2 = buf.like(h2.u, "du2"), ddelta2 = buf.like(h2.u, "dd2"), dz2 = buf.like(h2.u, "dz2");
  Tensor dB1 = buf.like(h1.Bm, "dB1"), dC1 = buf.like(h1.Cm, "dC1"), dB2 = buf.like(h2.Bm, "dB2"),
         dC2 = buf.like(h2.Cm, "dC2");
  Tensor dA2 = buf.like(d.A, "dA2"), dD2 = buf.like(d.D, "dD2"),
         dbias2 = buf.like(d.bias, "dbias2"), dh0b = buf.like(d.h0, "dh0b");
  for (const Tensor* t : {&dA2, &dD2, &dbias2}) test::zero(*t);
  Tensor ws2 = buf.make(DType::f64, {selective_scan_workspace_elems(in)}, "ws2");
  selective_scan_backward(in2, part(dy, t1, t2, "dy2"), nullptr,
                          {&du2, &ddelta2, &dA2, &dB2, &dC2, &dD2, &dz2, &dbias2, &dmid}, ws2);
  for (int64_t b = 0; b < c.b; ++b)
    if (d.seq.ptr<int32_t>()[b * c.t + t1] != d.seq.ptr<int32_t>()[b * c.t + t1 - 1])
      for (int64_t i = 0; i < c.c * c.n; ++i) dmid.ptr<double>()[b * c.c * c.n + i] = 0;
  selective_scan_backward(in1, part(dy, 0, t1, "dy1"), &dmid,
                          {&du1, &ddelta1, &dA2, &dB1, &dC1, &dD2, &dz1, &dbias2, &dh0b}, ws2);
  EXPECT_LE(test::max_violation(du1, part(du, 0, t1, "a"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(du2, part(du, t1, t2, "b"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(ddelta1, part(ddelta, 0, t1, "c"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dB2, part(dB, t1, t2, "d"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dA2, dA, 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dD2, dD, 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dbias2, dbias, 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dh0b, dh0, 1e-12, 1e-10), 1.0);
}

TEST(SelectiveScan, SingleStepMatchesHandComputation) {
  Buffers buf;
  const ScanCase c{1, 1, 1, 1, 1, false, false, false, true};
  ScanData d = make_scan(buf, c);
  d.u.ptr<double>()[0] = 2, d.delta.ptr<double>()[0] = 0.25, d.bias.ptr<double>()[0] = 0.25;
  d.A.ptr<double>()[0] = -1, d.Bm.ptr<double>()[0] = 3, d.Cm.ptr<double>()[0] = 0.5;
  d.D.ptr<double>()[0] = 0.1, d.h0.ptr<double>()[0] = 4;
  Tensor y = buf.like(d.u, "y"), hT = buf.like(d.h0, "hT");
  selective_scan_forward(inputs(d, c), y, &hT);
  const double h = std::exp(-0.5) * 4 + 0.5 * 3 * 2;
  EXPECT_NEAR(test::at(hT, 0), h, 1e-15);
  EXPECT_NEAR(test::at(y, 0), 0.5 * h + 0.2, 1e-15);
}

}  // namespace
}  // namespace braid
