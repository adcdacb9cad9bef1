// The MoE router and token dispatch on the GPU against the CPU reference (skipped where no GPU is
// visible); fresh random inputs, outputs poisoned first, repeat runs bit-identical.
// Router: the scores are f32 on both sides, the GPU's with expf/logf (a few ulp): within 2x the
// CPU f32 error against f64 plus 2^-21 relative. The choices, weights, slots and counts must
// then follow exactly from the GPU's own scores (the host repeats the kernel's f32 arithmetic):
// comparing choices with the CPU's directly would fail on near-ties that an ulp flips. The loss
// sums (f64 over f32 terms) within 2^-20 relative of the host's f64 sums over the GPU's scores.
// The backward, given the GPU's saved routing, against the CPU f32 backward on the same
// routing: each dlogit is a sum of O(E) f32 terms, so within E 2^-22 of the largest |dlogit|.
// Dispatch: the plan (offsets, row_token) and gathers are exact; the combine and the gather's
// backward add K products in f32 and round once to the row dtype: within (K + 1) 2^-24 of the
// sum of |terms| plus the output's rounding (2^-8 relative for bf16, 2^-24 for f32); the
// combine's weight gradient (a tree over D in f32) within (log2 D + D / 128 + 2) 2^-24 of the
// sum of |dy oe|.
#include <cmath>
#include <cstring>
#include <random>

#include "layers/moe_dispatch/moe_dispatch.h"
#include "layers/moe_router/moe_router.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

std::vector<int32_t> ints(const std::vector<char>& bytes) {
  std::vector<int32_t> out(bytes.size() / sizeof(int32_t));
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}
std::vector<float> floats(const std::vector<char>& bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

struct RouterCase {
  int64_t m, e, k;
  bool sigmoid, normalize, bias;
  double capacity;  // <= 0: dropless
};

class GpuRouter : public GpuTest<RouterCase> {};

TEST_P(GpuRouter, MatchesReference) {
  const RouterCase c = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const RouterConfig cfg{c.k, c.sigmoid ? RouterScore::sigmoid : RouterScore::softmax, c.normalize,
                         c.capacity};
  const int64_t m = c.m, e = c.e, k = c.k;
  const HostTensor logits = random_tensor({m, e}, -3, 3, false, g);
  const HostTensor bias = random_tensor({e}, -0.1, 0.1, false, g);
  // CPU: f64 reference and f32.
  auto cpu_run = [&](DType t) {
    struct Out {
      Tensor lg, sc, ex, sl, wt, cnt, bias;
      RouterLosses l;
    } o;
    o.lg = make(logits, t, Device::cpu, "logits");
    o.bias = make(bias, t, Device::cpu, "bias");
    o.sc = empty({m, e}, t, Device::cpu, "scores");
    o.ex = empty({m, k}, DType::i32, Device::cpu, "expert");
    o.sl = empty({m, k}, DType::i32, Device::cpu, "slot");
    o.wt = empty({m, k}, t, Device::cpu, "weight");
    o.cnt = empty({e}, DType::i32, Device::cpu, "counts");
    o.l =
        router_forward(o.lg, c.bias ? &o.bias : nullptr, cfg, {&o.sc, &o.ex, &o.sl, &o.wt, &o.cnt});
    return o;
  };
  const auto r64 = cpu_run(DType::f64), r32 = cpu_run(DType::f32);
  // GPU, outputs poisoned.
  const Tensor lg = make(logits, DType::f32, Device::cuda, "logits"),
               bs = make(bias, DType::f32, Device::cuda, "bias"),
               sc = empty({m, e}, DType::f32, Device::cuda, "scores"),
               ex = empty({m, k}, DType::i32, Device::cuda, "expert"),
               sl = empty({m, k}, DType::i32, Device::cuda, "slot"),
               wt = empty({m, k}, DType::f32, Device::cuda, "weight"),
               cnt = empty({e}, DType::i32, Device::cuda, "counts"),
               ws = empty({router_workspace_elems()}, DType::f64, Device::cuda, "ws");
  for (const Tensor* t : {&sc, &wt}) gpu_->fill(*t, std::nan(""), {});
  for (const Tensor* t : {&ex, &sl, &cnt}) gpu_->fill(*t, -7, {});
  const RouterOutputs out{&sc, &ex, &sl, &wt, &cnt, &ws};
  const RouterLosses got = router_forward(lg, c.bias ? &bs : nullptr, cfg, out);
  // Scores.
  const std::vector<double> s = download(sc), ref = host_values(r64.sc, false),
                            naive = host_values(r32.sc, false);
  EXPECT_LE(max_err(s, ref), 2 * max_err(naive, ref) + std::ldexp(1.0, -21)) << "scores";
  // Choices, weights, slots and counts from the GPU's own scores, in the kernel's f32 arithmetic.
  const std::vector<float> sf = floats(download_bytes(sc)), wg = floats(download_bytes(wt));
  const std::vector<int32_t> eg = ints(download_bytes(ex)), slg = ints(download_bytes(sl)),
                             cg = ints(download_bytes(cnt));
  const std::vector<float> bf(r32.bias.ptr<float>(), r32.bias.ptr<float>() + e);
  std::vector<int32_t> want_cnt(e, 0);
  const int64_t cap = router_capacity(cfg, m, e);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < m; ++i) {
    std::vector<int32_t> chosen;
    float total = 0.f;
    std::vector<float> w;
    for (int64_t kk = 0; kk < k; ++kk) {
      int32_t best = -1;
      float best_v = 0.f;
      for (int32_t j = 0; j < e; ++j) {
        bool taken = false;
        for (int32_t q : chosen) taken = taken || q == j;
        if (taken) continue;
        const float v = sf[i * e + j] + (c.bias ? bf[j] : 0.f);
        if (best < 0 || v > best_v) best = j, best_v = v;
      }
      chosen.push_back(best);
      w.push_back(sf[i * e + best]);
      total += sf[i * e + best];
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      const float wk = c.normalize ? w[kk] / total : w[kk];
      const int32_t j = chosen[kk];
      const int32_t slot = want_cnt[j] < cap ? want_cnt[j] : -1;
      ++want_cnt[j];
      mismatches += eg[i * k + kk] != j || wg[i * k + kk] != wk || slg[i * k + kk] != slot;
    }
  }
  EXPECT_EQ(mismatches, 0) << "choices, weights or slots differ from the GPU scores' top-k";
  EXPECT_EQ(cg, want_cnt);
  // Losses from the GPU's scores and counts (f64 sums).
  double aux = 0, z = 0;
  for (int64_t i = 0; i < m; ++i) {
    double norm = 1, mx = -1e300, se = 0;
    if (c.sigmoid) {
      norm = 0;
      for (int64_t j = 0; j < e; ++j) norm += sf[i * e + j];
    }
    for (int64_t j = 0; j < e; ++j) aux += double(cg[j]) * sf[i * e + j] / norm;
    for (int64_t j = 0; j < e; ++j) mx = std::max(mx, logits.v[i * e + j]);
    for (int64_t j = 0; j < e; ++j) se += std::exp(logits.v[i * e + j] - mx);
    z += (mx + std::log(se)) * (mx + std::log(se));
  }
  aux *= double(e) / (double(k) * double(m) * double(m));
  z /= double(m);
  EXPECT_NEAR(got.aux, aux, std::ldexp(std::abs(aux), -20) + 1e-12) << "aux";
  EXPECT_NEAR(got.z, z, std::ldexp(std::abs(z), -20) + 1e-12) << "z";
  // Backward on the GPU's routing, against the CPU f32 backward on the same routing.
  const HostTensor dw = random_tensor({m, k}, -1, 1, false, g);
  HostTensor hs{{m, e}, std::vector<double>(sf.begin(), sf.end())};
  HostTensor he{{m, k}, std::vector<double>(eg.begin(), eg.end())};
  HostTensor hsl{{m, k}, std::vector<double>(slg.begin(), slg.end())};
  HostTensor hc{{e}, std::vector<double>(cg.begin(), cg.end())};
  const Tensor c_sc = make(hs, DType::f32, Device::cpu, "scores"),
               c_ex = make(he, DType::i32, Device::cpu, "expert"),
               c_sl = make(hsl, DType::i32, Device::cpu, "slot"),
               c_cnt = make(hc, DType::i32, Device::cpu, "counts"),
               c_wt = empty({m, k}, DType::f32, Device::cpu, "weight"),
               c_dw = make(dw, DType::f32, Device::cpu, "dweight"),
               c_dl = empty({m, e}, DType::f32, Device::cpu, "dlogits");
  router_backward(r32.lg, cfg, {&c_sc, &c_ex, &c_sl, &c_wt, &c_cnt}, c_dw, 0.3, 0.05, c_dl);
  const Tensor g_dw = make(dw, DType::f32, Device::cuda, "dweight"),
               g_dl = empty({m, e}, DType::f32, Device::cuda, "dlogits");
  gpu_->fill(g_dl, std::nan(""), {});
  router_backward(lg, cfg, out, g_dw, 0.3, 0.05, g_dl);
  const std::vector<double> dl = download(g_dl), dref = host_values(c_dl, false);
  EXPECT_LE(max_err(dl, dref), double(e) * std::ldexp(max_abs(dref), -22)) << "dlogits";
  // Repeat runs: the same bits.
  const std::vector<char> first = download_bytes(g_dl);
  router_forward(lg, c.bias ? &bs : nullptr, cfg, out);
  EXPECT_EQ(ints(download_bytes(sl)), slg);
  router_backward(lg, cfg, out, g_dw, 0.3, 0.05, g_dl);
  EXPECT_EQ(download_bytes(g_dl), first);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuRouter,
                         ::testing::Values(RouterCase{1, 4, 1, false, false, false, 0.0},
                                           RouterCase{1000, 8, 2, false, false, false, 0.0},
                                           RouterCase{1037, 8, 2, false, true, false, 1.0},
                                           RouterCase{4096, 64, 8, true, true, true, 1.25},
                                           RouterCase{3000, 16, 4, true, false, true, 0.0},
                                           RouterCase{5000, 8, 2, false, false, false, 0.5}));

struct DispatchCase {
  int64_t m, e, k, d;
  bool bf16;
  double capacity;
};

class GpuDispatch : public GpuTest<DispatchCase> {};

TEST_P(GpuDispatch, MatchesReference) {
  const DispatchCase c = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const int64_t m = c.m, e = c.e, k = c.k, d = c.d;
  const RouterConfig cfg{k, RouterScore::softmax, true, c.capacity};
  // Routing from the CPU router.
  const Tensor lg = make(random_tensor({m, e}, -2, 2, false, g), DType::f32, Device::cpu, "lg"),
               sc = empty({m, e}, DType::f32, Device::cpu, "scores"),
               ex = empty({m, k}, DType::i32, Device::cpu, "expert"),
               sl = empty({m, k}, DType::i32, Device::cpu, "slot"),
               wt = empty({m, k}, DType::f32, Device::cpu, "weight"),
               cnt = empty({e}, DType::i32, Device::cpu, "counts");
  router_forward(lg, nullptr, cfg, {&sc, &ex, &sl, &wt, &cnt});
  const int64_t cap = router_capacity(cfg, m, e);
  auto to_host = [](const Tensor& t) {
    HostTensor h{std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim), {}};
    for (int64_t i = 0; i < t.numel(); ++i)
      h.v.push_back(t.dtype == DType::i32 ? double(t.ptr<int32_t>()[i]) : t.ptr<float>()[i]);
    return h;
  };
  const HostTensor hex = to_host(ex), hsl = to_host(sl), hcnt = to_host(cnt), hwt = to_host(wt);
  // CPU plan (f64 rows for the reference).
  const Tensor off = empty({e + 1}, DType::i32, Device::cpu, "offsets"),
               tok = empty({m * k}, DType::i32, Device::cpu, "row_token");
  const int64_t rows = moe_dispatch_plan(ex, sl, cnt, cap, off, tok);
  // GPU plan.
  const Tensor g_ex = make(hex, DType::i32, Device::cuda, "expert"),
               g_sl = make(hsl, DType::i32, Device::cuda, "slot"),
               g_cnt = make(hcnt, DType::i32, Device::cuda, "counts"),
               g_wt = make(hwt, DType::f32, Device::cuda, "weight"),
               g_off = empty({e + 1}, DType::i32, Device::cuda, "offsets"),
               g_tok = empty({m * k}, DType::i32, Device::cuda, "row_token");
  gpu_->fill(g_off, -7, {}), gpu_->fill(g_tok, -7, {});
  std::vector<int32_t> host_off;
  EXPECT_EQ(moe_dispatch_plan(g_ex, g_sl, g_cnt, cap, g_off, g_tok, &host_off), rows);
  const std::vector<int32_t> want_off(off.ptr<int32_t>(), off.ptr<int32_t>() + e + 1);
  EXPECT_EQ(ints(download_bytes(g_off)), want_off);
  EXPECT_EQ(host_off, want_off);
  const std::vector<int32_t> gt = ints(download_bytes(g_tok));
  EXPECT_TRUE(std::equal(gt.begin(), gt.begin() + rows, tok.ptr<int32_t>())) << "row_token";
  // Gather: exact copies.
  const DType t = c.bf16 ? DType::bf16 : DType::f32;
  const HostTensor x = random_tensor({m, d}, -1, 1, c.bf16, g);
  const Tensor g_x = make(x, t, Device::cuda, "x"), g_xe = empty({m * k, d}, t, Device::cuda, "xe");
  gpu_->fill(g_xe, std::nan(""), {});
  moe_gather(g_x, g_tok, rows, g_xe);
  const std::vector<double> xe = download(g_xe);
  int64_t wrong = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < d; ++j) wrong += xe[r * d + j] != x.v[tok.ptr<int32_t>()[r] * d + j];
  EXPECT_EQ(wrong, 0) << "gathered rows";
  // Combine and its backward; the gather's backward.
  const HostTensor oe = random_tensor({m * k, d}, -1, 1, c.bf16, g),
                   dy = random_tensor({m, d}, -1, 1, c.bf16, g),
                   dx0 = random_tensor({m, d}, -1, 1, c.bf16, g);
  const Tensor g_oe = make(oe, t, Device::cuda, "oe"), g_dy = make(dy, t, Device::cuda, "dy"),
               g_y = empty({m, d}, t, Device::cuda, "y"),
               g_doe = empty({m * k, d}, t, Device::cuda, "doe"),
               g_dwt = empty({m, k}, DType::f32, Device::cuda, "dweight"),
               g_dx = make(dx0, t, Device::cuda, "dx");
  gpu_->fill(g_y, std::nan(""), {}), gpu_->fill(g_doe, std::nan(""), {});
  gpu_->fill(g_dwt, std::nan(""), {});
  moe_combine(g_oe, g_ex, g_sl, g_off, g_wt, g_y);
  moe_combine_backward(g_dy, g_oe, g_ex, g_sl, g_off, g_wt, g_doe, g_dwt);
  moe_gather_backward(g_oe, g_ex, g_sl, g_off, g_dx);
  const std::vector<double> y = download(g_y), doe = download(g_doe), dwt = download(g_dwt),
                            dx = download(g_dx);
  const double out_round = c.bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
  const double tree = (std::log2(double(d)) + double(d) / 128 + 2) * std::ldexp(1.0, -24);
  const int32_t* o = want_off.data();
  int64_t bad_y = 0, bad_dx = 0, bad_doe = 0, bad_dw = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      double ry = 0, ay = 0, rx = dx0.v[i * d + j], ax = std::abs(rx);
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t a = i * k + kk;
        if (hsl.v[a] < 0) continue;
        const int64_t r = o[int64_t(hex.v[a])] + int64_t(hsl.v[a]);
        ry += hwt.v[a] * oe.v[r * d + j], ay += std::abs(hwt.v[a] * oe.v[r * d + j]);
        rx += oe.v[r * d + j], ax += std::abs(oe.v[r * d + j]);
      }
      const double ulps = double(k + 1) * std::ldexp(1.0, -24);
      bad_y += !(std::abs(y[i * d + j] - ry) <= ulps * ay + out_round * std::abs(ry));
      bad_dx += !(std::abs(dx[i * d + j] - rx) <= ulps * ax + out_round * std::abs(rx));
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t a = i * k + kk;
      if (hsl.v[a] < 0) {
        bad_dw += dwt[a] != 0.0;
        continue;
      }
      const int64_t r = o[int64_t(hex.v[a])] + int64_t(hsl.v[a]);
      double rw = 0, aw = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double want = double(float(hwt.v[a]) * float(dy.v[i * d + j]));
        const double got = c.bf16 ? double(from_bf16(to_bf16(float(want)))) : want;
        bad_doe += doe[r * d + j] != got;
        rw += dy.v[i * d + j] * oe.v[r * d + j], aw += std::abs(dy.v[i * d + j] * oe.v[r * d + j]);
      }
      bad_dw += !(std::abs(dwt[a] - rw) <= tree * aw);
    }
  }
  EXPECT_EQ(bad_y, 0) << "combine";
  EXPECT_EQ(bad_dx, 0) << "gather backward";
  EXPECT_EQ(bad_doe, 0) << "combine backward: rows";
  EXPECT_EQ(bad_dw, 0) << "combine backward: weights";
  // Repeat: the same bits.
  const std::vector<char> y1 = download_bytes(g_y), dw1 = download_bytes(g_dwt);
  moe_combine(g_oe, g_ex, g_sl, g_off, g_wt, g_y);
  moe_combine_backward(g_dy, g_oe, g_ex, g_sl, g_off, g_wt, g_doe, g_dwt);
  EXPECT_EQ(download_bytes(g_y), y1);
  EXPECT_EQ(download_bytes(g_dwt), dw1);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuDispatch,
                         ::testing::Values(DispatchCase{1, 4, 1, 8, false, 0.0},
                                           DispatchCase{300, 8, 2, 64, true, 0.0},
                                           DispatchCase{1000, 8, 2, 200, true, 1.0},
                                           DispatchCase{777, 16, 4, 130, false, 0.5},
                                           DispatchCase{2048, 64, 8, 256, true, 1.25}));

}  // namespace
}  // namespace braid
