// Context-parallel selective scan, SSD, causal conv1d and attention (under mpirun with P ranks,
// cp = P): each
// rank holds a shard of the sequence; the outputs, the final state (last rank), and every gradient
// (the sequence's initial state on rank 0; dA, dD, d(dt bias) summed over the ranks) equal the
// single-process op over the whole sequence. In f64 both compute the same sums in another order, so
// they agree to 1e-10 relative. Cases: documents that start inside a shard and exactly at a shard's
// first token, an initial state, the z gate, two groups; for attention GQA and shard lengths that
// the load-balancing chunks (2P of them) do not divide.
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "layers/attention/attention_cp.h"
#include "layers/causal_conv1d/causal_conv1d_cp.h"
#include "layers/selective_scan/selective_scan_cp.h"
#include "layers/ssd/ssd_cp.h"
#include "parallel/communicator.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace braid;

struct Host {
  std::vector<double> v;
  std::vector<int64_t> shape;
  Tensor t;
  Host(std::vector<int64_t> s, std::vector<double> values) : v(std::move(values)), shape(s) {
    t = Tensor::contiguous_view(v.data(), DType::f64, Device::cpu, shape, "t");
  }
  explicit Host(std::vector<int64_t> s) : shape(s) {
    int64_t n = 1;
    for (int64_t x : s) n *= x;
    v.assign(n, 0.0);
    t = Tensor::contiguous_view(v.data(), DType::f64, Device::cpu, shape, "t");
  }
};

// Rows [t0, t0 + len) along dimension 1 of a [B, T, ...] tensor.
std::vector<double> shard(const Host& h, int64_t t0, int64_t len) {
  int64_t inner = 1;
  for (size_t i = 2; i < h.shape.size(); ++i) inner *= h.shape[i];
  std::vector<double> out;
  for (int64_t b = 0; b < h.shape[0]; ++b)
    for (int64_t t = t0; t < t0 + len; ++t)
      for (int64_t i = 0; i < inner; ++i) out.push_back(h.v[(b * h.shape[1] + t) * inner + i]);
  return out;
}

int failures = 0;
void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& want, int rank) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i)
    err = std::max(err, std::fabs(got[i] - want[i])), scale = std::max(scale, std::fabs(want[i]));
  if (!(got.size() == want.size() && err <= 1e-10 * std::max(scale, 1.0))) {
    std::fprintf(stderr, "rank %d: %s: error %.3g (scale %.3g)\n", rank, what.c_str(), err, scale);
    ++failures;
  }
}

// A [B,T,...] tensor's rows [t0, t0 + len) of every sequence, as a [B,len,...] tensor.
Host shard_of(const Host& h, int64_t t0, int64_t len) {
  std::vector<int64_t> s = h.shape;
  s[1] = len;
  return Host(s, shard(h, t0, len));
}

// seq_idx [B,T] rows [t0, t0 + len) of every sequence.
std::vector<int32_t> seq_shard(const std::vector<int32_t>& seq, int64_t b, int64_t t, int64_t t0,
                               int64_t len) {
  std::vector<int32_t> out;
  for (int64_t row = 0; row < b; ++row)
    for (int64_t i = t0; i < t0 + len; ++i) out.push_back(seq[row * t + i]);
  return out;
}

// Accumulated gradients (name, this shard's, the whole op's): summed over the ranks they equal
// the whole op's.
void expect_summed(Communicator& cp, const std::string& tag,
                   std::initializer_list<std::tuple<const char*, const Host*, const Host*>> grads) {
  for (auto [name, mine, want] : grads) {
    std::vector<double> sum = mine->v;
    cp.all_reduce(
        Tensor::contiguous_view(sum.data(), DType::f64, Device::cpu, {int64_t(sum.size())}, "sum"),
        ReduceOp::sum);
    expect_close(tag + name + " (summed over the ranks)", sum, want->v, cp.rank());
  }
}

double value(uint64_t i, int salt) {
  return std::sin(0.731 * double(i) + 1.37 * salt) * 0.9;
}
std::vector<double> values(int64_t n, int salt, double lo = 0, double scale = 1) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = lo + scale * value(i, salt);
  return v;
}

// Documents: row 0 starts one inside shard 0 and one exactly at shard 1's first token; row 1 one
// in the middle of the last shard.
std::vector<int32_t> documents(int64_t b, int64_t t, int64_t tr) {
  std::vector<int32_t> seq(b * t, 0);
  for (int64_t i = 0; i < t; ++i) {
    seq[i] = (i >= tr / 2 ? 1 : 0) + (i >= tr ? 1 : 0);
    seq[t + i] = i >= t - tr / 2 ? 1 : 0;
  }
  return seq;
}

void check(Communicator& cp, int64_t tr, bool docs) {
  const int r = cp.rank(), p = cp.size();
  const int64_t b = 2, t = tr * p, c = 4, n = 3, g = 2;
  Host u({b, t, c}, values(b * t * c, 1)), delta({b, t, c}, values(b * t * c, 2, -0.5));
  Host z({b, t, c}, values(b * t * c, 3)), Bm({b, t, g, n}, values(b * t * g * n, 4)),
      Cm({b, t, g, n}, values(b * t * g * n, 5)), dy({b, t, c}, values(b * t * c, 6));
  Host A({c, n}, values(c * n, 7, -1.0, 0.5)), D({c}, values(c, 8)), bias({c}, values(c, 9));
  Host h0({b, c, n}, values(b * c * n, 10)), dfinal({b, c, n}, values(b * c * n, 11));
  std::vector<int32_t> seq = documents(b, t, tr);
  const Tensor seq_all = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  // The whole sequence on one process.
  ScanInputs whole{
      &u.t,  &delta.t, &A.t, &Bm.t, &Cm.t, &D.t, &z.t, &bias.t, docs ? &seq_all : nullptr,
      &h0.t, true};
  Host y({b, t, c}), fin({b, c, n}), ws({selective_scan_workspace_elems(whole)});
  selective_scan_forward(whole, y.t, &fin.t, &ws.t);
  Host du({b, t, c}), dd({b, t, c}), dA({c, n}), dB({b, t, g, n}), dC({b, t, g, n}), dD({c}),
      dz({b, t, c}), db({c}), dh0({b, c, n});
  selective_scan_backward(whole, dy.t, &dfinal.t,
                          {&du.t, &dd.t, &dA.t, &dB.t, &dC.t, &dD.t, &dz.t, &db.t, &dh0.t}, ws.t);
  // This rank's shard.
  const int64_t t0 = r * tr;
  Host su = shard_of(u, t0, tr), sdelta = shard_of(delta, t0, tr), sz = shard_of(z, t0, tr),
       sB = shard_of(Bm, t0, tr), sC = shard_of(Cm, t0, tr), sdy = shard_of(dy, t0, tr);
  std::vector<int32_t> sseq = seq_shard(seq, b, t, t0, tr);
  const Tensor seq_shard =
      Tensor::contiguous_view(sseq.data(), DType::i32, Device::cpu, {b, tr}, "seq");
  ScanInputs mine{
      &su.t, &sdelta.t, &A.t, &sB.t, &sC.t, &D.t, &sz.t, &bias.t, docs ? &seq_shard : nullptr,
      &h0.t, true};
  Host sy({b, tr, c}), sfin({b, c, n}), sws({selective_scan_workspace_elems(mine)}),
      entering({b, c, n});
  selective_scan_forward_cp(mine, sy.t, &sfin.t, entering.t, sws.t, cp);
  Host sdu({b, tr, c}), sdd({b, tr, c}), sdA({c, n}), sdB({b, tr, g, n}), sdC({b, tr, g, n}),
      sdD({c}), sdz({b, tr, c}), sdb({c}), sdh({b, c, n});
  selective_scan_backward_cp(
      mine, entering.t, sdy.t, &dfinal.t,
      {&sdu.t, &sdd.t, &sdA.t, &sdB.t, &sdC.t, &sdD.t, &sdz.t, &sdb.t, &sdh.t}, sws.t, cp);
  const std::string tag =
      std::string(docs ? "documents" : "one document") + ", shard " + std::to_string(tr) + ": ";
  expect_close(tag + "y", sy.v, shard(y, t0, tr), r);
  if (r == p - 1) expect_close(tag + "final state", sfin.v, fin.v, r);
  expect_close(tag + "du", sdu.v, shard(du, t0, tr), r);
  expect_close(tag + "ddelta", sdd.v, shard(dd, t0, tr), r);
  expect_close(tag + "dz", sdz.v, shard(dz, t0, tr), r);
  expect_close(tag + "dB", sdB.v, shard(dB, t0, tr), r);
  expect_close(tag + "dC", sdC.v, shard(dC, t0, tr), r);
  if (r == 0) expect_close(tag + "dinitial_state", sdh.v, dh0.v, r);
  expect_summed(cp, tag, {{"dA", &sdA, &dA}, {"dD", &sdD, &dD}, {"ddelta_bias", &sdb, &db}});
}

void check_ssd(Communicator& cp, int64_t tr, bool docs) {
  const int r = cp.rank(), p = cp.size();
  const int64_t b = 2, t = tr * p, h = 4, hp = 3, g = 2, n = 3;
  Host x({b, t, h, hp}, values(b * t * h * hp, 21)), dt({b, t, h}, values(b * t * h, 22, -0.5));
  Host Bm({b, t, g, n}, values(b * t * g * n, 23)), Cm({b, t, g, n}, values(b * t * g * n, 24));
  Host dy({b, t, h, hp}, values(b * t * h * hp, 25)), A({h}, values(h, 26, -1.0, 0.5));
  Host D({h}, values(h, 27)), bias({h}, values(h, 28)),
      h0({b, h, hp, n}, values(b * h * hp * n, 29));
  Host dfinal({b, h, hp, n}, values(b * h * hp * n, 30));
  std::vector<int32_t> seq = documents(b, t, tr);
  const Tensor seq_all = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  SsdInputs whole{&x.t,  &dt.t, &A.t, &Bm.t, &Cm.t, &D.t, &bias.t, docs ? &seq_all : nullptr,
                  &h0.t, true};
  whole.chunk = 4;
  Host y({b, t, h, hp}), fin({b, h, hp, n}), fws({ssd_forward_workspace_elems(whole)}),
      bws({ssd_backward_workspace_elems(whole)});
  ssd_forward(whole, y.t, &fin.t, fws.t);
  Host dx({b, t, h, hp}), ddt({b, t, h}), dA({h}), dB({b, t, g, n}), dC({b, t, g, n}), dD({h}),
      db({h}), dh0({b, h, hp, n});
  ssd_backward(whole, dy.t, &dfinal.t, {&dx.t, &ddt.t, &dA.t, &dB.t, &dC.t, &dD.t, &db.t, &dh0.t},
               bws.t);
  const int64_t t0 = r * tr;
  Host sx = shard_of(x, t0, tr), sdt = shard_of(dt, t0, tr), sB = shard_of(Bm, t0, tr),
       sC = shard_of(Cm, t0, tr), sdy = shard_of(dy, t0, tr);
  std::vector<int32_t> sseq = seq_shard(seq, b, t, t0, tr);
  const Tensor seq_shard =
      Tensor::contiguous_view(sseq.data(), DType::i32, Device::cpu, {b, tr}, "seq");
  SsdInputs mine{&sx.t, &sdt.t, &A.t, &sB.t, &sC.t, &D.t, &bias.t, docs ? &seq_shard : nullptr,
                 &h0.t, true};
  mine.chunk = 4;
  Host sy({b, tr, h, hp}), sfin({b, h, hp, n}), sfws({ssd_forward_workspace_elems(mine)}),
      sbws({ssd_backward_workspace_elems(mine)}), entering({b, h, hp, n});
  ssd_forward_cp(mine, sy.t, &sfin.t, entering.t, sfws.t, cp);
  Host sdx({b, tr, h, hp}), sddt({b, tr, h}), sdA({h}), sdB({b, tr, g, n}), sdC({b, tr, g, n}),
      sdD({h}), sdb({h}), sdh({b, h, hp, n});
  ssd_backward_cp(mine, entering.t, sdy.t, &dfinal.t,
                  {&sdx.t, &sddt.t, &sdA.t, &sdB.t, &sdC.t, &sdD.t, &sdb.t, &sdh.t}, sbws.t, cp);
  const std::string tag = std::string("ssd, ") + (docs ? "documents" : "one document") +
                          ", shard " + std::to_string(tr) + ": ";
  expect_close(tag + "y", sy.v, shard(y, t0, tr), r);
  if (r == p - 1) expect_close(tag + "final state", sfin.v, fin.v, r);
  expect_close(tag + "dx", sdx.v, shard(dx, t0, tr), r);
  expect_close(tag + "ddt", sddt.v, shard(ddt, t0, tr), r);
  expect_close(tag + "dB", sdB.v, shard(dB, t0, tr), r);
  expect_close(tag + "dC", sdC.v, shard(dC, t0, tr), r);
  if (r == 0) expect_close(tag + "dinitial_state", sdh.v, dh0.v, r);
  expect_summed(cp, tag, {{"dA", &sdA, &dA}, {"dD", &sdD, &dD}, {"ddt_bias", &sdb, &db}});
}

void check_conv(Communicator& cp, int64_t tr, bool docs) {
  const int r = cp.rank(), p = cp.size();
  const int64_t b = 2, t = tr * p, c = 5, w = 4;
  Host x({b, t, c}, values(b * t * c, 41)), wt({c, w}, values(c * w, 42)), bias({c}, values(c, 43));
  Host dy({b, t, c}, values(b * t * c, 44)), h0({b, c, w - 1}, values(b * c * (w - 1), 45));
  Host dfinal({b, c, w - 1}, values(b * c * (w - 1), 46));
  std::vector<int32_t> seq = documents(b, t, tr);
  const Tensor seq_all = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  const Conv1dInputs whole{&x.t, &wt.t, &bias.t, docs ? &seq_all : nullptr, &h0.t, true};
  Host y({b, t, c}), fin({b, c, w - 1});
  causal_conv1d_forward(whole, y.t, &fin.t);
  Host dx({b, t, c}), dw({c, w}), db({c}), dh0({b, c, w - 1});
  causal_conv1d_backward(whole, dy.t, &dfinal.t, {&dx.t, &dw.t, &db.t, &dh0.t});
  const int64_t t0 = r * tr;
  Host sx = shard_of(x, t0, tr), sdy = shard_of(dy, t0, tr);
  std::vector<int32_t> sseq = seq_shard(seq, b, t, t0, tr);
  const Tensor seq_shard =
      Tensor::contiguous_view(sseq.data(), DType::i32, Device::cpu, {b, tr}, "seq");
  const Conv1dInputs mine{&sx.t, &wt.t, &bias.t, docs ? &seq_shard : nullptr, &h0.t, true};
  Host sy({b, tr, c}), sfin({b, c, w - 1}), entering({b, c, w - 1});
  causal_conv1d_forward_cp(mine, sy.t, &sfin.t, entering.t, cp);
  Host sdx({b, tr, c}), sdw({c, w}), sdb({c}), sdh({b, c, w - 1});
  causal_conv1d_backward_cp(mine, entering.t, sdy.t, &dfinal.t, {&sdx.t, &sdw.t, &sdb.t, &sdh.t},
                            cp);
  const std::string tag = std::string("conv1d, ") + (docs ? "documents" : "one document") +
                          ", shard " + std::to_string(tr) + ": ";
  expect_close(tag + "y", sy.v, shard(y, t0, tr), r);
  if (r == p - 1) expect_close(tag + "final state", sfin.v, fin.v, r);
  expect_close(tag + "dx", sdx.v, shard(dx, t0, tr), r);
  if (r == 0) expect_close(tag + "dinitial_state", sdh.v, dh0.v, r);
  expect_summed(cp, tag, {{"dw", &sdw, &dw}, {"dbias", &sdb, &db}});
}

void check_attention(Communicator& cp, int64_t tr, bool docs) {
  const int r = cp.rank(), p = cp.size();
  const int64_t b = 2, t = tr * p, h = 4, hk = 2, d = 3;
  Host q({b, t, h, d}, values(b * t * h * d, 51)), k({b, t, hk, d}, values(b * t * hk * d, 52));
  Host v({b, t, hk, d}, values(b * t * hk * d, 53)), dout({b, t, h, d}, values(b * t * h * d, 54));
  std::vector<int32_t> seq = documents(b, t, tr);
  const Tensor seq_all = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "s");
  const double scale = 0.7;
  const AttentionInputs whole{&q.t, &k.t, &v.t, docs ? &seq_all : nullptr, scale};
  Host o({b, t, h, d}), lse({b, h, t}), dq({b, t, h, d}), dk({b, t, hk, d}), dv({b, t, hk, d});
  attention_forward(whole, o.t, lse.t);
  attention_backward(whole, o.t, lse.t, dout.t, dq.t, dk.t, dv.t);
  const int64_t t0 = r * tr;
  Host sq = shard_of(q, t0, tr), sk = shard_of(k, t0, tr), sv = shard_of(v, t0, tr),
       sdo = shard_of(dout, t0, tr);
  std::vector<int32_t> sseq = seq_shard(seq, b, t, t0, tr);
  const Tensor seq_shard =
      Tensor::contiguous_view(sseq.data(), DType::i32, Device::cpu, {b, tr}, "seq");
  const AttentionInputs mine{&sq.t, &sk.t, &sv.t, docs ? &seq_shard : nullptr, scale};
  Host so({b, tr, h, d}), slse({b, h, tr}), sdq({b, tr, h, d}), sdk({b, tr, hk, d}),
      sdv({b, tr, hk, d});
  attention_forward_cp(mine, so.t, slse.t, cp);
  attention_backward_cp(mine, so.t, slse.t, sdo.t, sdq.t, sdk.t, sdv.t, cp);
  const std::string tag = std::string("attention, ") + (docs ? "documents" : "one document") +
                          ", shard " + std::to_string(tr) + ": ";
  std::vector<double> lse_mine;
  for (int64_t i = 0; i < b * h; ++i)
    for (int64_t j = t0; j < t0 + tr; ++j) lse_mine.push_back(lse.v[i * t + j]);
  expect_close(tag + "o", so.v, shard(o, t0, tr), r);
  expect_close(tag + "lse", slse.v, lse_mine, r);
  expect_close(tag + "dq", sdq.v, shard(dq, t0, tr), r);
  expect_close(tag + "dk", sdk.v, shard(dk, t0, tr), r);
  expect_close(tag + "dv", sdv.v, shard(dv, t0, tr), r);
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  try {
    for (bool docs : {false, true})
      for (int64_t tr : {4, 7})
        check(*world, tr, docs), check_ssd(*world, tr, docs), check_conv(*world, tr, docs),
            check_attention(*world, tr, docs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", world->rank(), e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures, argv[0]);
}
