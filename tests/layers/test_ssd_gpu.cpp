// SSD forward and backward on the GPU against the CPU reference (skipped where no GPU is
// visible), plus bit-identical repeat runs and the refusals of unsupported shapes.
//
// Tolerance. The CPU reference runs in f64 (the truth) and in f32 on the same inputs (x, B, C, dy
// rounded to bf16 first, bf16 outputs rounded to bf16 as a bf16 kernel must): the naive error.
// The kernels also round to bf16 what the tensor cores multiply and a naive f32 path keeps in
// f32: the weighted B tile (w_j B_j), the state S_c and its gradient, the score tiles
// (C_i . B_j) e^(a_i - a_j) dt_j (off the diagonal tile: (C_i . B_j) times its column factor
// e^(a_ref - a_j) dt_j, the row factor e^(a_i - a_ref) applied in f32) and their backward
// counterparts, and the row-scaled operands of
// the dB/dC state terms. Each term of an output goes through at most four such roundings (a
// dB/dC state term: the chunk-state weight, the stored state, the row scale; the dx state term:
// two), each within 2^-9 of the term, so the extra error of an output is at most
// 4 * 2^-9 = 2^-7 times the sum of its terms' magnitudes. That sum, M, is what the f64
// reference returns with every input replaced by its absolute value (x, B, C, D, dy, the
// states: the decays e^(dt A) and dt are positive already, so every term of y, dx, dB, dC and
// dinitial_state becomes its magnitude). So element by element:
//   |gpu - f64| <= 2 max|naive - f64| + 2^-7 M + 1e-6 max|f64|.
// dinitial_state alone (ssd_initial_state_grad, the chunked kernels' state-gradient pass on the
// forward's workspace) rounds only the weighted dy tile (e^(a_i) dy_i) and keeps the pass in
// f32: within the same bound.
// ddt is a difference of such sums (da = dy.(y - Dx) - dt x.X' + ...), so its M is not a bound
// of its terms; it is checked against the whole tensor's scale: the same bound with M replaced by
// the largest M of ddt (whose terms include all of da's through the reverse scan) and of dx
// (x . X' is the largest single term): "flat". dA and ddt_bias sum the B T per-token terms of
// each head, each within that bound, with independent roundings: their error is checked against
// 4 sqrt(B T) flat (four standard deviations of a sum of B T errors uniform in +-flat, rather
// than the worst case B T flat).
// The f32 path (every tensor f32: the step-by-step recurrence of ssd_f32.cu) rounds nothing to
// bf16 (the naive error is then taken without rounding the outputs); it differs from the f32
// reference only in the order of its f32 sums (over warps, over the heads of a group). An output
// gathers at most T = 700 steps of N <= 256-term products, K < 2^18 roundings of 2^-24 each; they
// add like a random walk, sqrt(K) 2^-24 < 2^-15 of M, and the 2^-7 above becomes twice that,
// 2^-14.
#include <cmath>
#include <random>

#include "layers/ssd/ssd.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct GpuSsdCase {
  int64_t b, t, h, p, g, n, q;
  bool docs, init, softplus, d_channel, dfinal;
  double dt_min = 0.0, dt_max = INFINITY;
  double a_min = -1.5;  // A in [a_min, -0.1]: -8 gives 64-token decay spans past 60 (the
                        // kernels' element-by-element diagonal) beside shorter ones
};

class GpuSsd : public GpuTest<GpuSsdCase> {};

TEST_P(GpuSsd, ForwardAndBackwardMatchReference) {
  const GpuSsdCase k = GetParam();
  const uint64_t seed = std::random_device{}();  // fresh inputs every run; printed on failure
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  // Without softplus, dt = dt_raw + bias is kept positive.
  const double lo = k.softplus ? -4 : 0.01;
  const double hi = k.softplus ? 0 : 0.5;
  const HostTensor x = random_tensor({k.b, k.t, k.h, k.p}, -1, 1, true, g),
                   dt = random_tensor({k.b, k.t, k.h}, lo, hi, false, g);
  const HostTensor Bm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, true, g),
                   Cm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, true, g);
  const HostTensor A = random_tensor({k.h}, k.a_min, -0.1, false, g),
                   bias = random_tensor({k.h}, k.softplus ? -0.5 : 0, 0.3, false, g);
  const std::vector<int64_t> d_shape =
      k.d_channel ? std::vector<int64_t>{k.h, k.p} : std::vector<int64_t>{k.h};
  const HostTensor D = random_tensor(d_shape, -1, 1, false, g),
                   h0 = random_tensor({k.b, k.h, k.p, k.n}, -1, 1, false, g);
  const HostTensor dy = random_tensor({k.b, k.t, k.h, k.p}, -1, 1, true, g),
                   dfinal = random_tensor({k.b, k.h, k.p, k.n}, -1, 1, false, g);
  // Accumulated (+=) gradients start from these values on every path.
  const HostTensor dA0 = random_tensor({k.h}, -1, 1, false, g),
                   dD0 = random_tensor(d_shape, -1, 1, false, g),
                   dbias0 = random_tensor({k.h}, -1, 1, false, g);
  HostTensor seq{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  std::uniform_int_distribution<int> doc_break(0, 199);
  for (int64_t i = 0; i < k.b; ++i)
    for (int64_t j = 0, doc = 0; j < k.t; ++j) {
      if (j > 0 && doc_break(g) < 3) ++doc;
      seq.v[i * k.t + j] = double(doc);
    }
  auto absolute = [](HostTensor h) {
    for (double& v : h.v) v = std::abs(v);
    return h;
  };
  struct Run {
    std::vector<Tensor> keep;
    SsdInputs in;
    Tensor y, y_scan, state, dx, ddt, dA, dB, dC, dD, dbias, dinit, dy, dfinal, ws, scratch;
    Tensor dinit_only;  // ssd_initial_state_grad's (after the backward, on its workspace)
  };
  // act: x, B, C, y, dy and their gradients; par: the rest. magnitude: every input replaced by
  // its absolute value (the tolerance's M).
  // poison: what the outputs and the workspace hold before the run (NaN: an unwritten (=) output
  // or workspace read fails; the repeat run below uses a finite value, so that a read of an
  // unwritten workspace element that NaN would not reach, a compare or a select, shows too).
  auto run = [&](DType act, DType par, Device dev, Run& r, bool magnitude, bool with_out = false,
                 bool hopper = true, double poison = std::nan("")) {
    auto pick = [&](const HostTensor& h) { return magnitude ? absolute(h) : h; };
    r.keep = {make(pick(x), act, dev, "x"),  make(dt, par, dev, "dt"),
              make(A, par, dev, "A"),        make(pick(Bm), act, dev, "B"),
              make(pick(Cm), act, dev, "C"), make(pick(D), par, dev, "D"),
              make(bias, par, dev, "bias"),  make(seq, DType::i32, dev, "seq"),
              make(pick(h0), par, dev, "h0")};
    r.in = SsdInputs{};
    r.in.x = &r.keep[0], r.in.dt = &r.keep[1], r.in.A = &r.keep[2], r.in.B = &r.keep[3];
    r.in.C = &r.keep[4], r.in.D = &r.keep[5], r.in.dt_bias = &r.keep[6];
    r.in.seq_idx = k.docs ? &r.keep[7] : nullptr;
    r.in.initial_state = k.init ? &r.keep[8] : nullptr;
    r.in.dt_softplus = k.softplus, r.in.dt_min = k.dt_min, r.in.dt_max = k.dt_max;
    r.in.chunk = k.q;
    r.in.hopper = hopper;
    const std::vector<int64_t> bthp{k.b, k.t, k.h, k.p}, btgn{k.b, k.t, k.g, k.n},
        bhpn{k.b, k.h, k.p, k.n};
    r.y = empty(bthp, act, dev, "y"), r.state = empty(bhpn, par, dev, "state");
    r.dx = empty(bthp, act, dev, "dx"), r.ddt = empty({k.b, k.t, k.h}, par, dev, "ddt");
    r.dB = empty(btgn, act, dev, "dB"), r.dC = empty(btgn, act, dev, "dC");
    r.dinit = empty(bhpn, par, dev, "dinit"), r.dinit_only = empty(bhpn, par, dev, "dinit_only");
    r.dA = make(magnitude ? absolute(dA0) : dA0, par, dev, "dA");
    r.dD = make(magnitude ? absolute(dD0) : dD0, par, dev, "dD");
    r.dbias = make(magnitude ? absolute(dbias0) : dbias0, par, dev, "dbias");
    r.dy = make(pick(dy), act, dev, "dy"), r.dfinal = make(pick(dfinal), par, dev, "dfinal");
    const int64_t wn =
        std::max(ssd_forward_workspace_elems(r.in), ssd_backward_workspace_elems(r.in));
    r.ws = empty({wn}, dev == Device::cuda ? DType::f32 : act, dev, "workspace");
    if (dev == Device::cuda)
      for (const Tensor* t :
           {&r.y, &r.state, &r.dx, &r.ddt, &r.dB, &r.dC, &r.dinit, &r.dinit_only, &r.ws})
        gpu_->fill(*t, poison, {});
    if (with_out) {  // the forward also writes y - D x; the backward reads dy . (y - D x) there
      r.y_scan = empty(bthp, act, dev, "y_scan");
      gpu_->fill(r.y_scan, poison, {});
      r.in.y_scan = &r.y_scan;
    }
    // The passes' scratch (bf16 GPU rows), poisoned again before each pass: no pass reads what
    // another left there.
    if (const int64_t e = ssd_scratch_elems(r.in)) {
      r.scratch = empty({e}, DType::f32, dev, "scratch");
      r.in.scratch = &r.scratch;
    }
    auto poison_scratch = [&] {
      if (r.scratch.data) gpu_->fill(r.scratch, poison, {});
    };
    poison_scratch();
    ssd_forward(r.in, r.y, &r.state, r.ws);
    poison_scratch();
    ssd_backward(r.in, r.dy, k.dfinal ? &r.dfinal : nullptr,
                 {&r.dx, &r.ddt, &r.dA, &r.dB, &r.dC, &r.dD, &r.dbias, &r.dinit}, r.ws);
    poison_scratch();
    ssd_initial_state_grad(r.in, r.dy, k.dfinal ? &r.dfinal : nullptr, r.dinit_only, r.ws);
  };
  Run r64, r32, rm;
  run(DType::f64, DType::f64, Device::cpu, r64, false);
  run(DType::f32, DType::f32, Device::cpu, r32, false);
  run(DType::f64, DType::f64, Device::cpu, rm, true);
  // bf16, the backward both ways: recomputing dy . (y - D x), and reading it from the output;
  // the chunked forward kernels where the fused Hopper one is the default (ssd_fwd_hopper.cu);
  // then the f32 path.
  struct Path {
    DType act;
    bool with_out, hopper;
    const char* name;
  };
  for (const Path& path :
       {Path{DType::bf16, false, true, "backward recomputing"},
        Path{DType::bf16, true, true, "backward given y - D x"},
        Path{DType::bf16, true, false, "chunked forward"}, Path{DType::f32, false, true, "f32"}}) {
    const DType act = path.act;
    const bool with_out = path.with_out;
    SCOPED_TRACE(path.name);
    const int rounding = act == DType::f32 ? -14 : -7;  // see the header
    Run rg;
    run(act, DType::f32, Device::cuda, rg, false, with_out, path.hopper);
    const double mddt = max_abs(host_values(rm.ddt, false)),
                 mdx = max_abs(host_values(rm.dx, false));
    const double sum_terms = 4 * std::sqrt(double(k.b * k.t));
    auto check = [&](const char* what, Tensor Run::*field, bool activation, bool elementwise,
                     double terms = 1) {
      const std::vector<double> ref = host_values(r64.*field, false),
                                mag = host_values(rm.*field, false),
                                naive = host_values(r32.*field, activation && act == DType::bf16),
                                got = download(rg.*field);
      const double base = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
      const double flat = terms * std::ldexp(std::max(mddt, mdx), rounding);
      double worst = 0, worst_err = 0, worst_bound = 0;
      int64_t bad = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        const double err = std::isfinite(got[i]) ? std::abs(got[i] - ref[i]) : INFINITY;
        const double bound = base + (elementwise ? std::ldexp(std::abs(mag[i]), rounding) : flat);
        if (!(err <= bound)) ++bad;
        if (!(err / bound <= worst)) worst = err / bound, worst_err = err, worst_bound = bound;
      }
      EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size()
                        << " elements out of bounds; worst error " << worst_err << " against "
                        << worst_bound << " (naive error " << max_err(naive, ref) << ")";
      std::printf("  %-15s max err %.3g, worst err/bound %.3f\n", what, max_err(got, ref), worst);
    };
    check("y", &Run::y, true, true);
    check("final_state", &Run::state, false, true);
    check("dx", &Run::dx, true, true);
    check("dB", &Run::dB, true, true);
    check("dC", &Run::dC, true, true);
    check("dinitial_state", &Run::dinit, false, true);
    check("dinitial alone", &Run::dinit_only, false, true);
    check("dD", &Run::dD, false, true);
    check("ddt", &Run::ddt, false, false);
    check("dA", &Run::dA, false, false, sum_terms);
    check("ddt_bias", &Run::dbias, false, false, sum_terms);
    // A second run on the same inputs, its outputs and workspace holding other values before, is
    // bit-identical (no order-dependent sums, no read of what the run did not write).
    Run again;
    run(act, DType::f32, Device::cuda, again, false, with_out, path.hopper, -3.25);
    for (Tensor Run::*f : {&Run::y, &Run::state, &Run::dx, &Run::ddt, &Run::dA, &Run::dB, &Run::dC,
                           &Run::dD, &Run::dbias, &Run::dinit, &Run::dinit_only})
      EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
          << (rg.*f).name << " differs between runs";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuSsd,
                         ::testing::Values(
                             // b, t, h, p, g, n, q, docs, init, softplus, d_channel, dfinal
                             GpuSsdCase{1, 1, 2, 64, 1, 64, 64, false, false, true, false, false},
                             GpuSsdCase{1, 64, 1, 64, 1, 64, 64, false, false, true, false, false},
                             GpuSsdCase{2, 300, 4, 64, 2, 128, 128, true, true, true, false, true},
                             GpuSsdCase{1, 257, 2, 128, 1, 64, 64, true, false, true, true, true},
                             GpuSsdCase{2, 300, 3, 64, 1, 256, 256, true, true, true, false, false},
                             GpuSsdCase{1, 300, 2, 128, 2, 256, 128, false, true, true, true, true},
                             GpuSsdCase{3, 100, 8, 64, 4, 128, 256, true, false, true, false, true},
                             GpuSsdCase{1, 700, 4, 64, 1, 128, 256, true, true, true, false, true},
                             GpuSsdCase{2, 200, 2, 64, 1, 64, 64, false, false, false, true, false},
                             GpuSsdCase{1, 200, 2, 64, 1, 64, 64, true, true, true, false, true,
                                        0.05, 0.5},
                             GpuSsdCase{2, 400, 4, 64, 2, 128, 128, false, true, false, false, true,
                                        0.0, INFINITY, -8.0}));

class GpuSsdRefusals : public GpuTest<int> {};

TEST_P(GpuSsdRefusals, UnsupportedShapesAreNamed) {
  std::mt19937_64 g(1);
  auto inputs = [&](int64_t p, int64_t n, int64_t q, DType act, std::vector<Tensor>& keep) {
    keep = {make(random_tensor({1, 8, 2, p}, -1, 1, true, g), act, Device::cuda, "x"),
            make(random_tensor({1, 8, 2}, -1, 0, false, g), DType::f32, Device::cuda, "dt"),
            make(random_tensor({2}, -1, -0.5, false, g), DType::f32, Device::cuda, "A"),
            make(random_tensor({1, 8, 1, n}, -1, 1, true, g), act, Device::cuda, "B"),
            make(random_tensor({1, 8, 1, n}, -1, 1, true, g), act, Device::cuda, "C")};
    SsdInputs in;
    in.x = &keep[0], in.dt = &keep[1], in.A = &keep[2], in.B = &keep[3], in.C = &keep[4];
    in.chunk = q;
    return in;
  };
  auto message = [&](int64_t p, int64_t n, int64_t q, DType act,
                     bool small_scratch = false) -> std::string {
    std::vector<Tensor> keep;
    SsdInputs in = inputs(p, n, q, act, keep);
    Tensor y = empty({1, 8, 2, p}, act, Device::cuda, "y");
    Tensor ws = empty({ssd_forward_workspace_elems(in)}, DType::f32, Device::cuda, "ws");
    Tensor scratch = empty({1}, DType::f32, Device::cuda, "scratch");
    if (small_scratch) in.scratch = &scratch;
    try {
      ssd_forward(in, y, nullptr, ws);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(32, 64, 64, DType::bf16).find("head dim 32 must be 64 or 128"),
            std::string::npos);
  EXPECT_NE(message(64, 16, 64, DType::bf16).find("d_state 16 must be 64, 128 or 256"),
            std::string::npos);
  EXPECT_NE(message(64, 64, 100, DType::bf16).find("chunk size 100 must be 64, 128 or 256"),
            std::string::npos);
  EXPECT_NE(message(64, 64, 64, DType::f64).find("x must be bf16 or f32"), std::string::npos);
  EXPECT_NE(message(64, 64, 64, DType::bf16, true).find("scratch scratch[1]:f32@cuda smaller than"),
            std::string::npos);
}
INSTANTIATE_TEST_SUITE_P(Once, GpuSsdRefusals, ::testing::Values(0));

}  // namespace
}  // namespace braid
