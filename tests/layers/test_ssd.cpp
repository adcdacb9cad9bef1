// Mamba-2 SSD: the chunked form equals the quadratic form (chunk sizes that do and do not divide
// T, documents, initial state, D per head or per channel), f64 gradients against finite
// differences, dt limits, and the split-run property.
#include <string>

#include "layers/ssd/ssd.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::Buffers;

struct SsdCase {
  int64_t b, t, h, p, g, n, chunk;
  bool docs, init;
  bool d_channel = false;  // D per channel [H,P] instead of per head [H]
};

struct SsdData {
  Tensor x, dt, A, Bm, Cm, D, bias, seq, h0;
};

SsdData make_ssd(Buffers& buf, const SsdCase& c) {
  SsdData d;
  d.x = buf.make(DType::f64, {c.b, c.t, c.h, c.p}, "x");
  d.dt = buf.make(DType::f64, {c.b, c.t, c.h}, "dt");
  d.A = buf.make(DType::f64, {c.h}, "A");
  d.D = c.d_channel ? buf.make(DType::f64, {c.h, c.p}, "D") : buf.like(d.A, "D");
  d.bias = buf.like(d.A, "dt_bias");
  d.Bm = buf.make(DType::f64, {c.b, c.t, c.g, c.n}, "B");
  d.Cm = buf.like(d.Bm, "C");
  d.seq = buf.make(DType::i32, {c.b, c.t}, "seq_idx");
  d.h0 = buf.make(DType::f64, {c.b, c.h, c.p, c.n}, "h0");
  test::fill_uniform(d.x, -1, 1);
  test::fill_uniform(d.dt, -1.5, 0.5);
  test::fill_uniform(d.A, -1.5, -0.3);
  test::fill_uniform(d.D, -1, 1);
  test::fill_uniform(d.bias, -0.5, 0.5);
  test::fill_uniform(d.Bm, -1, 1);
  test::fill_uniform(d.Cm, -1, 1);
  test::fill_uniform(d.h0, -1, 1);
  for (int64_t i = 0; i < c.b; ++i)
    for (int64_t j = 0, doc = 0; j < c.t; ++j) {
      if (j > 0 && (j * 3 + i) % 5 == 0) ++doc;
      d.seq.ptr<int32_t>()[i * c.t + j] = int32_t(doc);
    }
  return d;
}

SsdInputs inputs(const SsdData& d, const SsdCase& c) {
  SsdInputs in;
  in.x = &d.x, in.dt = &d.dt, in.A = &d.A, in.B = &d.Bm, in.C = &d.Cm, in.D = &d.D,
  in.dt_bias = &d.bias;
  in.seq_idx = c.docs ? &d.seq : nullptr;
  in.initial_state = c.init ? &d.h0 : nullptr;
  in.chunk = c.chunk;
  return in;
}

Tensor forward_ws(Buffers& buf, const SsdInputs& in) {
  return buf.make(DType::f64, {ssd_forward_workspace_elems(in)}, "fwd_ws");
}

class SsdChunkedVsQuadratic : public ::testing::TestWithParam<SsdCase> {};

TEST_P(SsdChunkedVsQuadratic, Equal) {
  const auto c = GetParam();
  test::reseed(c.t * 101 + c.chunk * 7 + c.h);
  Buffers buf;
  SsdData d = make_ssd(buf, c);
  const SsdInputs in = inputs(d, c);
  Tensor y = buf.like(d.x, "y"), yq = buf.like(d.x, "yq"), s = buf.like(d.h0, "s"),
         sq = buf.like(d.h0, "sq");
  for (const Tensor* t : {&y, &yq, &s, &sq}) test::poison(*t);
  ssd_forward(in, y, &s, forward_ws(buf, in));
  ssd_forward_quadratic(in, yq, &sq);
  // Same math, different association of sums of O(T) terms of size O(1) in f64: 1e-12 relative.
  EXPECT_LE(test::max_violation(y, yq, 1e-12, 1e-11), 1.0);
  EXPECT_LE(test::max_violation(s, sq, 1e-12, 1e-11), 1.0);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SsdChunkedVsQuadratic,
                         ::testing::Values(SsdCase{1, 8, 2, 3, 1, 4, 4, false, false},
                                           SsdCase{2, 13, 4, 2, 2, 3, 4, true, true},
                                           SsdCase{1, 20, 2, 4, 1, 2, 7, true, false},
                                           SsdCase{2, 9, 3, 2, 3, 5, 16, false, true},
                                           SsdCase{1, 33, 2, 2, 1, 3, 1, true, true},
                                           SsdCase{1, 64, 4, 4, 2, 8, 16, true, true},
                                           SsdCase{2, 21, 2, 3, 1, 2, 8, true, true, true}));

class SsdGrad : public ::testing::TestWithParam<SsdCase> {};

TEST_P(SsdGrad, MatchesFiniteDifferences) {
  const auto c = GetParam();
  test::reseed(c.t * 13 + c.h * 5 + c.n);
  Buffers buf;
  SsdData d = make_ssd(buf, c);
  const SsdInputs in = inputs(d, c);
  Tensor y = buf.like(d.x, "y"), py = buf.like(d.x, "py"), hT = buf.like(d.h0, "hT"),
         ph = buf.like(d.h0, "ph");
  test::fill_uniform(py, -1, 1);
  test::fill_uniform(ph, -1, 1);
  Tensor fws = forward_ws(buf, in);
  auto loss = [&] {
    test::poison(y);
    ssd_forward(in, y, &hT, fws);
    return test::weighted_sum(y, py) + test::weighted_sum(hT, ph);
  };
  loss();
  Tensor dx = buf.like(d.x, "dx"), ddt = buf.like(d.dt, "ddt"), dA = buf.like(d.A, "dA"),
         dB = buf.like(d.Bm, "dB");
  Tensor dC = buf.like(d.Cm, "dC"), dD = buf.like(d.D, "dD"), dbias = buf.like(d.bias, "dbias"),
         dh0 = buf.like(d.h0, "dh0");
  for (const Tensor* t : {&dx, &ddt, &dB, &dC, &dh0}) test::poison(*t);
  Tensor ws = buf.make(DType::f64, {ssd_backward_workspace_elems(in)}, "ws");
  ssd_backward(in, py, &ph, {&dx, &ddt, &dA, &dB, &dC, &dD, &dbias, &dh0}, ws);
  test::expect_gradient("dx", d.x, dx, loss);
  test::expect_gradient("ddt", d.dt, ddt, loss);
  test::expect_gradient("dA", d.A, dA, loss);
  test::expect_gradient("dB", d.Bm, dB, loss);
  test::expect_gradient("dC", d.Cm, dC, loss);
  test::expect_gradient("dD", d.D, dD, loss);
  test::expect_gradient("ddt_bias", d.bias, dbias, loss);
  if (c.init) test::expect_gradient("dinitial_state", d.h0, dh0, loss);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SsdGrad,
                         ::testing::Values(SsdCase{1, 1, 1, 1, 1, 1, 4, false, false},
                                           SsdCase{1, 7, 2, 3, 1, 2, 4, false, true},
                                           SsdCase{2, 10, 4, 2, 2, 3, 3, true, true},
                                           SsdCase{1, 9, 3, 2, 3, 4, 8, true, false},
                                           SsdCase{2, 9, 2, 3, 1, 2, 4, true, true, true}));

TEST(Ssd, DtLimitsClampAndStopGradient) {
  const SsdCase c{1, 6, 2, 2, 1, 2, 4, false, false};
  test::reseed(77);
  Buffers buf;
  SsdData d = make_ssd(buf, c);
  SsdInputs in = inputs(d, c);
  in.dt_min = 0.3;
  in.dt_max = 0.6;
  Tensor y = buf.like(d.x, "y"), yq = buf.like(d.x, "yq"), py = buf.like(d.x, "py");
  test::fill_uniform(py, -1, 1);
  Tensor fws = forward_ws(buf, in);
  ssd_forward(in, y, nullptr, fws);
  ssd_forward_quadratic(in, yq, nullptr);
  EXPECT_LE(test::max_violation(y, yq, 1e-12, 1e-11), 1.0);
  auto loss = [&] {
    ssd_forward(in, y, nullptr, fws);
    return test::weighted_sum(y, py);
  };
  Tensor dx = buf.like(d.x, "dx"), ddt = buf.like(d.dt, "ddt"), dA = buf.like(d.A, "dA"),
         dB = buf.like(d.Bm, "dB");
  Tensor dC = buf.like(d.Cm, "dC"), dD = buf.like(d.D, "dD"), dbias = buf.like(d.bias, "dbias");
  Tensor ws = buf.make(DType::f64, {ssd_backward_workspace_elems(in)}, "ws");
  ssd_backward(in, py, nullptr, {&dx, &ddt, &dA, &dB, &dC, &dD, &dbias, nullptr}, ws);
  test::expect_gradient("ddt (clamped)", d.dt, ddt, loss);
  int64_t zeros = 0;
  for (int64_t i = 0; i < ddt.numel(); ++i) zeros += test::at(ddt, i) == 0.0;
  EXPECT_GT(zeros, 0) << "some dt should be clamped for these inputs";
}

TEST(Ssd, CpuRefusesYScan) {  // y - D x is a GPU-only saved tensor; the CPU recomputes it
  const SsdCase c{1, 6, 2, 2, 1, 2, 4, false, false};
  test::reseed(3);
  Buffers buf;
  SsdData d = make_ssd(buf, c);
  SsdInputs in = inputs(d, c);
  Tensor y = buf.like(d.x, "y"), ys = buf.like(d.x, "y_scan");
  in.y_scan = &ys;
  try {
    ssd_forward(in, y, nullptr, forward_ws(buf, in));
    ADD_FAILURE() << "ssd_forward accepted y_scan on the CPU";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("y_scan"), std::string::npos) << e.what();
  }
}

TEST(Ssd, SplitRunEqualsFullRun) {
  const SsdCase c{2, 14, 4, 2, 2, 3, 4, true, true};
  test::reseed(5);
  Buffers buf;
  SsdData d = make_ssd(buf, c);
  const SsdInputs in = inputs(d, c);
  Tensor y = buf.like(d.x, "y"), dy = buf.like(d.x, "dy");
  test::fill_uniform(dy, -1, 1);
  ssd_forward(in, y, nullptr, forward_ws(buf, in));
  Tensor dx = buf.like(d.x, "dx"), ddt = buf.like(d.dt, "ddt"), dA = buf.like(d.A, "dA"),
         dB = buf.like(d.Bm, "dB");
  Tensor dC = buf.like(d.Cm, "dC"), dD = buf.like(d.D, "dD"), dbias = buf.like(d.bias, "dbias"),
         dh0 = buf.like(d.h0, "dh0");
  for (const Tensor* t : {&dA, &dD, &dbias}) test::zero(*t);
  Tensor ws = buf.make(DType::f64, {ssd_backward_workspace_elems(in)}, "ws");
  ssd_backward(in, dy, nullptr, {&dx, &ddt, &dA, &dB, &dC, &dD, &dbias, &dh0}, ws);

  const int64_t t1 = 6, t2 = c.t - t1;
  auto part = [&](const Tensor& f, int64_t s, int64_t l, const char* n) {
    return test::time_slice(buf, f, s, l, n);
  };
  SsdData h1 = d, h2 = d;
  for (auto [dst, s, l] : {std::tuple{&h1, int64_t(0), t1}, std::tuple{&h2, t1, t2}}) {
    dst->x = part(d.x, s, l, "x"), dst->dt = part(d.dt, s, l, "dt"),
    dst->Bm = part(d.Bm, s, l, "B");
    dst->Cm = part(d.Cm, s, l, "C"), dst->seq = part(d.seq, s, l, "seq");
  }
  SsdCase c1 = c, c2 = c;
  c1.t = t1, c2.t = t2;
  const SsdInputs in1 = inputs(h1, c1);
  SsdInputs in2 = inputs(h2, c2);
  Tensor mid = buf.like(d.h0, "mid"), dmid = buf.like(d.h0, "dmid");
  in2.initial_state = &mid;
  Tensor y1 = buf.like(h1.x, "y1"), y2 = buf.like(h2.x, "y2");
  ssd_forward(in1, y1, &mid, forward_ws(buf, in1));
  const int64_t per = c.h * c.p * c.n;
  auto zero_if_new_doc = [&](const Tensor& s) {
    for (int64_t b = 0; b < c.b; ++b)
      if (d.seq.ptr<int32_t>()[b * c.t + t1] != d.seq.ptr<int32_t>()[b * c.t + t1 - 1])
        for (int64_t i = 0; i < per; ++i) s.ptr<double>()[b * per + i] = 0;
  };
  zero_if_new_doc(mid);
  ssd_forward(in2, y2, nullptr, forward_ws(buf, in2));
  EXPECT_LE(test::max_violation(y1, part(y, 0, t1, "ya"), 1e-13, 1e-11), 1.0);
  EXPECT_LE(test::max_violation(y2, part(y, t1, t2, "yb"), 1e-13, 1e-11), 1.0);
  Tensor dx1 = buf.like(h1.x, "dx1"), ddt1 = buf.like(h1.dt, "ddt1"), dB1 = buf.like(h1.Bm, "dB1"),
         dC1 = buf.like(h1.Cm, "dC1");
  Tensor dx2 = buf.like(h2.x, "dx2"), ddt2 = buf.like(h2.dt, "ddt2"), dB2 = buf.like(h2.Bm, "dB2"),
         dC2 = buf.like(h2.Cm, "dC2");
  Tensor dA2 = buf.like(d.A, "dA2"), dD2 = buf.like(d.D, "dD2"),
         dbias2 = buf.like(d.bias, "dbias2"), dh0b = buf.like(d.h0, "dh0b");
  for (const Tensor* t : {&dA2, &dD2, &dbias2}) test::zero(*t);
  ssd_backward(in2, part(dy, t1, t2, "dy2"), nullptr,
               {&dx2, &ddt2, &dA2, &dB2, &dC2, &dD2, &dbias2, &dmid}, ws);
  zero_if_new_doc(dmid);
  ssd_backward(in1, part(dy, 0, t1, "dy1"), &dmid,
               {&dx1, &ddt1, &dA2, &dB1, &dC1, &dD2, &dbias2, &dh0b}, ws);
  EXPECT_LE(test::max_violation(dx1, part(dx, 0, t1, "a"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dx2, part(dx, t1, t2, "b"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(ddt1, part(ddt, 0, t1, "c"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dC2, part(dC, t1, t2, "d"), 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dA2, dA, 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dbias2, dbias, 1e-12, 1e-10), 1.0);
  EXPECT_LE(test::max_violation(dh0b, dh0, 1e-12, 1e-10), 1.0);
}

}  // namespace
}  // namespace braid
