// Attention and RoPE on the GPU against the CPU reference (skipped where no GPU is visible), plus
// bit-identical repeat runs of the deterministic backward and the refusals of unsupported input.
//
// Tolerance. The CPU reference runs in f64 (the truth) and in f32 on the same inputs (q, k, v,
// do rounded to bf16 first, bf16 outputs rounded to bf16 as a bf16 kernel must): the naive error.
// The backward of every path gets the same o (the f64 forward's, rounded to bf16) and lse, so
// each output is compared on identical inputs. The kernels also round to bf16 what the tensor
// cores multiply and a naive f32 path keeps in f32: the probabilities p_ts (operand of P V and
// P^T dO) and ds_ts = p_ts (dp_ts - D_t) (operand of dS K and dS^T Q). Every term of an output
// goes through one such rounding, within 2^-9 of the term, so the extra error is at most 2^-9
// times the sum of the terms' magnitudes, M:
//   o_t: sum_s p_ts |v_s| / 1   dv_s: sum_t p_ts |do_t|   dq_t: scale sum_s |ds_ts| |k_s|
//   dk_s: scale sum_t |ds_ts| |q_t|       (element by element, computed here in f64)
// and we allow twice that (2^-8 M) for the f32 sums' own reordering. ds_ts also carries the f32
// error of dp_ts - D_t, which the kernels compute in other orders than the naive path (tensor
// cores, a separate pass for D): each dot product of P <= 128 terms errs by at most
// P 2^-24 <= 2^-17 of its terms' magnitudes, so |ds| in M is widened by
// 2^-9 p_ts (|do_t|.|v_s| + |do_t|.|o_t|) (2^-9 2^-8 = 2^-17). So element by element:
//   |gpu - f64| <= 2 max|naive - f64| + 2^-8 M + 1e-6 max|f64|.
// lse is f32 throughout (ex2/lg2 approximations, 2^-22 relative): 2 naive + 4e-6 (1 + |lse|).
// The f32 path (attention_f32.cu, every tensor f32) is checked the same way with 2^-14 M, as the
// comment at `check` derives.
// RoPE: the GPU rotates in f32 with f32 cos/sin (from f64 angles) and rounds to the output dtype,
// as the naive path does: 2 naive + 2^-20 (|x_i| + |x_i+P/2|).
#include <cmath>
#include <random>

#include "layers/attention/attention.h"
#include "layers/attention/attention_cp.h"
#include "layers/rope/rope.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct GpuAttnCase {
  int64_t b, t, h, hk, p;
  int doc_rate;  // per mille chance that a new document starts at a token (0: one document)
  // Only some query rows (context parallelism): 1, rows [T/4, T/2) and [3T/4 + 3, T); 2, those of
  // cp rank 1 of 2 (two adjacent quarters, whose edge may fall inside a 64-row tile).
  int subset = 0;
};

class GpuAttention : public GpuTest<GpuAttnCase> {};

// The magnitude sums M of the tolerance, from f64 inputs and the reference lse.
struct Magnitudes {
  std::vector<double> o, dq, dk, dv;
};
Magnitudes magnitudes(const GpuAttnCase& k, const HostTensor& q, const HostTensor& kk,
                      const HostTensor& v, const HostTensor& go, const std::vector<double>& o,
                      const std::vector<double>& lse, const HostTensor& seq, double scale,
                      const AttentionRows* rows) {
  Magnitudes m;
  m.o.assign(q.v.size(), 0), m.dq.assign(q.v.size(), 0);
  m.dk.assign(kk.v.size(), 0), m.dv.assign(kk.v.size(), 0);
  const int64_t P = k.p, grp = k.h / k.hk;
  auto at_q = [&](int64_t b, int64_t t, int64_t h) { return ((b * k.t + t) * k.h + h) * P; };
  auto at_k = [&](int64_t b, int64_t t, int64_t h) { return ((b * k.t + t) * k.hk + h) * P; };
  for (int64_t b = 0; b < k.b; ++b)
    for (int64_t h = 0; h < k.h; ++h)
      for (int64_t t = 0; t < k.t; ++t) {
        if (rows && !rows->has(t)) continue;
        const int64_t qi = at_q(b, t, h);
        double D = 0;
        for (int64_t i = 0; i < P; ++i) D += go.v[qi + i] * o[qi + i];
        const double l = lse[(b * k.h + h) * k.t + t];
        for (int64_t s = t; s >= 0 && seq.v[b * k.t + s] == seq.v[b * k.t + t]; --s) {
          const int64_t ki = at_k(b, s, h / grp);
          double sc = 0, dp = 0, dp_mag = 0;
          for (int64_t i = 0; i < P; ++i) sc += q.v[qi + i] * kk.v[ki + i];
          for (int64_t i = 0; i < P; ++i) dp += go.v[qi + i] * v.v[ki + i];
          for (int64_t i = 0; i < P; ++i)
            dp_mag += std::abs(go.v[qi + i]) * (std::abs(v.v[ki + i]) + std::abs(o[qi + i]));
          const double pr = std::exp(sc * scale - l);
          const double ds = std::abs(pr * (dp - D)) + std::ldexp(pr * dp_mag, -9);
          for (int64_t i = 0; i < P; ++i) {
            m.o[qi + i] += pr * std::abs(v.v[ki + i]);
            m.dq[qi + i] += scale * ds * std::abs(kk.v[ki + i]);
            m.dk[ki + i] += scale * ds * std::abs(q.v[qi + i]);
            m.dv[ki + i] += pr * std::abs(go.v[qi + i]);
          }
        }
      }
  return m;
}

TEST_P(GpuAttention, ForwardAndBackwardMatchReference) {
  const GpuAttnCase k = GetParam();
  const uint64_t seed = std::random_device{}();  // fresh inputs every run; printed on failure
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  // Scores of a few units: the softmax is neither flat nor one-hot.
  const HostTensor q = random_tensor({k.b, k.t, k.h, k.p}, -2, 2, true, g),
                   kk = random_tensor({k.b, k.t, k.hk, k.p}, -2, 2, true, g),
                   v = random_tensor({k.b, k.t, k.hk, k.p}, -1, 1, true, g),
                   go = random_tensor({k.b, k.t, k.h, k.p}, -1, 1, true, g);
  HostTensor seq{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  std::uniform_int_distribution<int> doc_break(0, 999);
  for (int64_t i = 0; i < k.b; ++i)
    for (int64_t j = 0, doc = 0; j < k.t; ++j) {
      if (j > 0 && doc_break(g) < k.doc_rate) ++doc;
      seq.v[i * k.t + j] = double(doc);
    }
  const double scale = 1.0 / std::sqrt(double(k.p));
  AttentionRows subset = cp_attention_rows(k.t, 1, 2);
  if (k.subset == 1) {
    subset.begin[0] = k.t / 4, subset.end[0] = k.t / 2;
    subset.begin[1] = 3 * k.t / 4 + 3, subset.end[1] = k.t;
  }
  const AttentionRows* rows = k.subset ? &subset : nullptr;
  const std::vector<int64_t> bthp{k.b, k.t, k.h, k.p}, btkp{k.b, k.t, k.hk, k.p};

  // Forward on the CPU in f64 and f32.
  auto cpu_forward = [&](DType t, Tensor& o, Tensor& lse, std::vector<Tensor>& keep) {
    keep = {make(q, t, Device::cpu, "q"), make(kk, t, Device::cpu, "k"),
            make(v, t, Device::cpu, "v"), make(seq, DType::i32, Device::cpu, "seq")};
    AttentionInputs in;
    in.q = &keep[0], in.k = &keep[1], in.v = &keep[2];
    in.seq_idx = k.doc_rate ? &keep[3] : nullptr;
    in.scale = scale, in.rows = rows;
    o = empty(bthp, t, Device::cpu, "o"), lse = empty({k.b, k.h, k.t}, t, Device::cpu, "lse");
    attention_forward(in, o, lse);
    return in;
  };
  std::vector<Tensor> keep64, keep32;
  Tensor o64, lse64, o32, lse32;
  const AttentionInputs in64 = cpu_forward(DType::f64, o64, lse64, keep64);
  const AttentionInputs in32 = cpu_forward(DType::f32, o32, lse32, keep32);
  // The backward's o and lse, shared by every path: the f64 forward's (o rounded to bf16).
  HostTensor o_in{bthp, host_values(o64, true)}, lse_in{{k.b, k.h, k.t}, host_values(lse64, false)};
  auto cpu_backward = [&](const AttentionInputs& in, DType t, Tensor& dq, Tensor& dk, Tensor& dv) {
    const Tensor o = make(o_in, t, Device::cpu, "o"), lse = make(lse_in, t, Device::cpu, "lse"),
                 dout = make(go, t, Device::cpu, "do");
    dq = empty(bthp, t, Device::cpu, "dq");
    dk = empty(btkp, t, Device::cpu, "dk"), dv = empty(btkp, t, Device::cpu, "dv");
    attention_backward(in, o, lse, dout, dq, dk, dv);
  };
  Tensor dq64, dk64, dv64, dq32, dk32, dv32;
  cpu_backward(in64, DType::f64, dq64, dk64, dv64);
  cpu_backward(in32, DType::f32, dq32, dk32, dv32);
  const Magnitudes mag = magnitudes(k, q, kk, v, go, o_in.v, lse_in.v, seq, scale, rows);

  // GPU: forward, backward (deterministic, then with atomics), outputs poisoned first; bf16
  // tensors (the tensor-core kernels) or f32 ones (attention_f32.cu).
  struct GpuInputs {
    Tensor q, k, v, seq, dout, o_in, lse_in, ws;
    AttentionInputs in;
  };
  auto gpu_inputs = [&](DType act) {
    auto r = std::make_unique<GpuInputs>();
    r->q = make(q, act, Device::cuda, "q"), r->k = make(kk, act, Device::cuda, "k");
    r->v = make(v, act, Device::cuda, "v"), r->seq = make(seq, DType::i32, Device::cuda, "seq");
    r->dout = make(go, act, Device::cuda, "do"), r->o_in = make(o_in, act, Device::cuda, "o_in");
    r->lse_in = make(lse_in, DType::f32, Device::cuda, "lse_in");
    r->in.q = &r->q, r->in.k = &r->k, r->in.v = &r->v;
    r->in.seq_idx = k.doc_rate ? &r->seq : nullptr;
    r->in.scale = scale, r->in.rows = rows;
    r->ws = empty({attention_gpu_workspace_elems(r->in)}, DType::f32, Device::cuda, "ws");
    r->in.workspace = &r->ws;
    return r;
  };
  struct Out {
    Tensor o, lse, dq, dk, dv;
  };
  auto gpu_run = [&](GpuInputs& gi, bool deterministic, bool hopper) {
    const DType act = gi.q.dtype;
    Out r{empty(bthp, act, Device::cuda, "o"),
          empty({k.b, k.h, k.t}, DType::f32, Device::cuda, "lse"),
          empty(bthp, act, Device::cuda, "dq"), empty(btkp, act, Device::cuda, "dk"),
          empty(btkp, act, Device::cuda, "dv")};
    for (const Tensor* t :
         std::initializer_list<const Tensor*>{&r.o, &r.lse, &r.dq, &r.dk, &r.dv, &gi.ws})
      gpu_->fill(*t, std::nan(""), {});
    gi.in.deterministic = deterministic, gi.in.hopper = hopper;
    attention_forward(gi.in, r.o, r.lse);
    attention_backward(gi.in, gi.o_in, gi.lse_in, gi.dout, r.dq, r.dk, r.dv);
    return r;
  };

  // row_of(i): the query row of element i of a [B,T,H,P] or [B,H,T] tensor, for o and lse (rows
  // outside the subset are not written); null: every element is checked.
  // rounding: log2 of the extra error per unit of magnitude, -8 for bf16 (see the header), -14
  // for f32 (no bf16 rounding, outputs not rounded in the naive error either: only the order of
  // the f32 sums differs, at most T = 1000 keys of P = 128-term products, 2^17 roundings of 2^-24
  // adding like a random walk, 2^-15.5; twice that).
  auto check = [&](const char* what, const Tensor& got_t, const Tensor& r64, const Tensor& r32,
                   bool activation, const std::vector<double>* m, int rounding,
                   int64_t (*row_of)(int64_t, const GpuAttnCase&) = nullptr) {
    const std::vector<double> ref = host_values(r64, false),
                              naive = host_values(r32, activation && rounding == -8),
                              got = download(got_t);
    const double base = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
    double worst = 0, worst_err = 0, worst_bound = 0;
    int64_t bad = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (rows && row_of && !rows->has(row_of(int64_t(i), k))) continue;
      const double err = std::isfinite(got[i]) ? std::abs(got[i] - ref[i]) : INFINITY;
      const double bound =
          base + (m ? std::ldexp((*m)[i], rounding) : 4e-6 * (1 + std::abs(ref[i])));
      if (!(err <= bound)) ++bad;
      if (!(err / bound <= worst)) worst = err / bound, worst_err = err, worst_bound = bound;
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size()
                      << " elements out of bounds; worst error " << worst_err << " against "
                      << worst_bound << " (naive error " << max_err(naive, ref) << ")";
    std::printf("  %-4s max err %.3g, worst err/bound %.3f\n", what, max_err(got, ref), worst);
  };
  // Both backward modes, and the forward's sm_80 path besides the Hopper one (where the GPU has
  // it; elsewhere both run the sm_80 kernel); then the f32 path.
  const auto bf16_in = gpu_inputs(DType::bf16), f32_in = gpu_inputs(DType::f32);
  for (auto [gi, det, hopper] :
       {std::tuple{bf16_in.get(), true, true}, std::tuple{bf16_in.get(), false, true},
        std::tuple{bf16_in.get(), true, false}, std::tuple{f32_in.get(), true, false}}) {
    const int rounding = gi == f32_in.get() ? -14 : -8;
    SCOPED_TRACE(gi == f32_in.get()
                     ? std::string("f32")
                     : std::string(det ? "deterministic backward" : "backward with atomics") +
                           (hopper ? ", Hopper forward" : ", sm_80 forward"));
    const Out r = gpu_run(*gi, det, hopper);
    check("o", r.o, o64, o32, true, &mag.o, rounding,
          [](int64_t i, const GpuAttnCase& c) { return i / (c.h * c.p) % c.t; });
    check("lse", r.lse, lse64, lse32, false, nullptr, rounding,
          [](int64_t i, const GpuAttnCase& c) { return i % c.t; });
    check("dq", r.dq, dq64, dq32, true, &mag.dq, rounding);
    check("dk", r.dk, dk64, dk32, true, &mag.dk, rounding);
    check("dv", r.dv, dv64, dv32, true, &mag.dv, rounding);
    if (det) {  // a second run on the same inputs is bit-identical
      const Out again = gpu_run(*gi, true, hopper);
      for (auto f : {&Out::o, &Out::lse, &Out::dq, &Out::dk, &Out::dv})
        EXPECT_TRUE(download_bytes(r.*f) == download_bytes(again.*f))
            << (r.*f).name << " differs between runs";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuAttention,
                         ::testing::Values(
                             // b, t, h, hk, p, doc_rate
                             GpuAttnCase{1, 1, 2, 1, 128, 0}, GpuAttnCase{2, 200, 4, 4, 64, 0},
                             GpuAttnCase{1, 384, 4, 1, 128, 30}, GpuAttnCase{3, 130, 6, 2, 64, 5},
                             GpuAttnCase{1, 1000, 2, 2, 128, 0}, GpuAttnCase{2, 257, 8, 2, 64, 60},
                             GpuAttnCase{1, 640, 3, 3, 64, 2},
                             // a subset of the query rows (context parallelism)
                             GpuAttnCase{2, 257, 4, 2, 64, 20, 1},
                             GpuAttnCase{1, 640, 2, 2, 128, 0, 1},
                             GpuAttnCase{1, 200, 2, 1, 64, 0, 2},
                             GpuAttnCase{2, 457, 4, 2, 128, 15, 2}));

class GpuAttentionRefusals : public GpuTest<int> {};

TEST_P(GpuAttentionRefusals, UnsupportedInputIsNamed) {
  std::mt19937_64 g(1);
  auto message = [&](int64_t p, DType t, bool backward) -> std::string {
    const Tensor q = make(random_tensor({1, 8, 2, p}, -1, 1, true, g), t, Device::cuda, "q");
    const Tensor kv = make(random_tensor({1, 8, 1, p}, -1, 1, true, g), t, Device::cuda, "kv");
    Tensor o = empty({1, 8, 2, p}, t, Device::cuda, "o");
    Tensor lse = empty({1, 2, 8}, DType::f32, Device::cuda, "lse");
    AttentionInputs in;
    in.q = &q, in.k = &kv, in.v = &kv, in.scale = 0.125;
    try {
      attention_forward(in, o, lse);
      if (backward) attention_backward(in, o, lse, o, o, kv, kv);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(32, DType::bf16, false).find("head dim 32 must be 64 or 128"),
            std::string::npos);
  EXPECT_NE(message(64, DType::f64, false).find("q must be bf16 or f32"), std::string::npos);
  EXPECT_NE(message(64, DType::bf16, true).find("needs a workspace"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Once, GpuAttentionRefusals, ::testing::Values(0));

struct GpuRopeCase {
  int64_t b, t, h, p;
  bool bf16;
};
class GpuRope : public GpuTest<GpuRopeCase> {};

TEST_P(GpuRope, ForwardAndBackwardMatchReference) {
  const GpuRopeCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const HostTensor x = random_tensor({k.b, k.t, k.h, k.p}, -1, 1, k.bf16, g);
  HostTensor pos{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  std::uniform_int_distribution<int> any(0, 131071);
  for (double& p : pos.v) p = any(g);  // long-context positions: large angles
  const double theta = 500000;
  const DType act = k.bf16 ? DType::bf16 : DType::f32;
  for (bool inverse : {false, true}) {
    SCOPED_TRACE(inverse ? "backward" : "forward");
    auto cpu = [&](DType t) {
      const Tensor xi = make(x, t, Device::cpu, "x"), pi = make(pos, DType::i32, Device::cpu, "p");
      Tensor y = empty(x.shape, t, Device::cpu, "y");
      inverse ? rope_backward(xi, pi, theta, y) : rope_forward(xi, pi, theta, y);
      return host_values(y, t == DType::f32 && k.bf16);
    };
    const std::vector<double> ref = cpu(DType::f64), naive = cpu(DType::f32);
    const Tensor gx = make(x, act, Device::cuda, "x"),
                 gp = make(pos, DType::i32, Device::cuda, "p");
    Tensor gy = empty(x.shape, act, Device::cuda, "y");
    gpu_->fill(gy, std::nan(""), {});
    inverse ? rope_backward(gx, gp, theta, gy) : rope_forward(gx, gp, theta, gy);
    const std::vector<double> got = download(gy);
    // In place (y aliases x) gives the same bits.
    inverse ? rope_backward(gx, gp, theta, gx) : rope_forward(gx, gp, theta, gx);
    EXPECT_TRUE(download_bytes(gx) == download_bytes(gy)) << "in-place result differs";
    const double base = 2 * max_err(naive, ref);
    int64_t bad = 0;
    const int64_t half = k.p / 2;
    for (int64_t i = 0; i < int64_t(ref.size()); ++i) {
      const int64_t c = i % k.p, pair = c < half ? i + half : i - half;
      const double bound = base + std::ldexp(std::abs(x.v[i]) + std::abs(x.v[pair]), -20);
      if (!(std::abs(got[i] - ref[i]) <= bound)) ++bad;
    }
    EXPECT_EQ(bad, 0) << bad << " elements out of bounds; max err " << max_err(got, ref)
                      << ", naive " << max_err(naive, ref);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuRope,
                         ::testing::Values(GpuRopeCase{2, 300, 3, 64, true},
                                           GpuRopeCase{1, 77, 5, 128, true},
                                           GpuRopeCase{1, 50, 2, 128, false}));

}  // namespace
}  // namespace braid
