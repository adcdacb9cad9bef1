// Selective scan forward and backward on the GPU against the CPU reference (skipped where no GPU
// is visible), plus bit-identical repeat runs.
// Tolerance (DESIGN: accept kernel error <= 2x the error of a naive same-precision
// implementation, against fp64): for each case the CPU reference runs in f64 (the truth) and in
// f32 on the same inputs (bf16 cases: inputs rounded to bf16 first, the f32 output rounded to
// bf16 as a bf16 kernel must). The GPU's largest error against f64 must be at most twice that
// naive error, plus an allowance for the kernels' approximate functions, which the naive path
// (libm) does not share: ex2.approx (2^-22 relative), rcp.approx (1 ulp) and the softplus series
// (< 10 ulp) put errors of ~2^-21 into dt and exp(dt A). Their effect on an output can exceed
// its size where terms cancel (one step of one channel, say), so it is measured: the f64
// reference runs again with delta and A perturbed by 2^-20, and the change of each output is
// added, with 1e-6 of the output scale. The same bound holds
// for every gradient: the GPU sums in fp32 like the naive path, in a different, mostly
// tree-shaped order whose error is no larger than the naive sequential sums'.
#include <cmath>
#include <cstring>
#include <random>

#include "layers/selective_scan/selective_scan.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct GpuScanCase {
  int64_t b, t, c, n, g;
  bool z, docs, init, softplus, bf16;
};

class GpuScan : public GpuTest<GpuScanCase> {};

// Every forward and backward output of one case against the f64 reference.
TEST_P(GpuScan, ForwardAndBackwardMatchReference) {
  const GpuScanCase k = GetParam();
  const uint64_t seed = std::random_device{}();  // fresh inputs every run; printed on failure
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const bool r = k.bf16;
  // Without softplus, dt = delta + bias is kept positive (a negative dt grows the state
  // exponentially, where no precision comparison means anything).
  const double lo = k.softplus ? -1 : 0;
  const HostTensor u = random_tensor({k.b, k.t, k.c}, -1, 1, r, g),
                   delta = random_tensor({k.b, k.t, k.c}, lo, 0.5, r, g);
  const HostTensor z = random_tensor({k.b, k.t, k.c}, -2, 2, r, g);
  const HostTensor Bm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, r, g),
                   Cm = random_tensor({k.b, k.t, k.g, k.n}, -1, 1, r, g);
  const HostTensor A = random_tensor({k.c, k.n}, -2, -0.2, false, g),
                   D = random_tensor({k.c}, -1, 1, false, g);
  const HostTensor bias = random_tensor({k.c}, lo, 0.5, false, g),
                   h0 = random_tensor({k.b, k.c, k.n}, -1, 1, false, g);
  const HostTensor dy = random_tensor({k.b, k.t, k.c}, -1, 1, r, g),
                   dfinal = random_tensor({k.b, k.c, k.n}, -1, 1, false, g);
  // Accumulated (+=) gradients start from these values on every path.
  const HostTensor dA0 = random_tensor({k.c, k.n}, -1, 1, false, g),
                   dD0 = random_tensor({k.c}, -1, 1, false, g),
                   dbias0 = random_tensor({k.c}, -1, 1, false, g);
  HostTensor seq{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  std::uniform_int_distribution<int> doc_break(0, 96);
  for (int64_t i = 0; i < k.b; ++i)
    for (int64_t j = 0, doc = 0; j < k.t; ++j) {
      if (j > 0 && doc_break(g) < 3) ++doc;
      seq.v[i * k.t + j] = double(doc);
    }
  struct Run {
    std::vector<Tensor> keep;
    ScanInputs in;
    Tensor y, state, du, ddelta, dz, dA, dB, dC, dD, dbias, dinit, dy, dfinal, ws, scratch;
  };
  auto run = [&](DType act, DType par, Device dev, Run& x, const HostTensor& dlt,
                 const HostTensor& a_, int lanes = 0) {
    x.keep = {
        make(u, act, dev, "u"),  make(dlt, act, dev, "delta"), make(a_, par, dev, "A"),
        make(Bm, act, dev, "B"), make(Cm, act, dev, "C"),      make(D, par, dev, "D"),
        make(z, act, dev, "z"),  make(bias, par, dev, "bias"), make(seq, DType::i32, dev, "seq"),
        make(h0, par, dev, "h0")};
    x.in = ScanInputs{&x.keep[0],
                      &x.keep[1],
                      &x.keep[2],
                      &x.keep[3],
                      &x.keep[4],
                      &x.keep[5],
                      k.z ? &x.keep[6] : nullptr,
                      &x.keep[7],
                      k.docs ? &x.keep[8] : nullptr,
                      k.init ? &x.keep[9] : nullptr,
                      k.softplus,
                      lanes};
    const std::vector<int64_t> btc{k.b, k.t, k.c}, btgn{k.b, k.t, k.g, k.n}, bcn{k.b, k.c, k.n};
    x.y = empty(btc, act, dev, "y"), x.state = empty(bcn, par, dev, "state");
    x.du = empty(btc, act, dev, "du"), x.ddelta = empty(btc, act, dev, "ddelta");
    x.dz = empty(btc, act, dev, "dz"), x.dB = empty(btgn, act, dev, "dB");
    x.dC = empty(btgn, act, dev, "dC"), x.dinit = empty(bcn, par, dev, "dinit");
    x.dA = make(dA0, par, dev, "dA"), x.dD = make(dD0, par, dev, "dD");
    x.dbias = make(dbias0, par, dev, "dbias");
    x.dy = make(dy, act, dev, "dy"), x.dfinal = make(dfinal, par, dev, "dfinal");
    const int64_t wn = selective_scan_workspace_elems(x.in);
    x.ws = empty({wn}, dev == Device::cuda ? DType::f32 : act, dev, "workspace");
    if (const int64_t e = selective_scan_scratch_elems(x.in)) {  // the backward's (GPU)
      x.scratch = empty({e}, DType::f32, dev, "scratch");
      x.in.scratch = &x.scratch;
    }
    if (dev == Device::cuda)  // poison: an unwritten (=) output or scratch read fails
      for (const Tensor* t :
           {&x.y, &x.state, &x.du, &x.ddelta, &x.dz, &x.dB, &x.dC, &x.dinit, &x.ws, &x.scratch})
        gpu_->fill(*t, std::nan(""), {});
    selective_scan_forward(x.in, x.y, &x.state, &x.ws);
    selective_scan_backward(
        x.in, x.dy, &x.dfinal,
        {&x.du, &x.ddelta, &x.dA, &x.dB, &x.dC, &x.dD, k.z ? &x.dz : nullptr, &x.dbias, &x.dinit},
        x.ws);
  };
  // The f64 reference again with delta and A perturbed by 2^-20 (relative, plus 2^-20 absolute
  // for delta): how much each output moves when dt and exp(dt A) carry errors a few times
  // those of the kernels' ex2.approx / rcp.approx / softplus series (~2^-21).
  HostTensor delta_p = delta, A_p = A;
  for (double& x : delta_p.v) x = x * (1 + std::ldexp(1.0, -20)) + std::ldexp(1.0, -20);
  for (double& x : A_p.v) x *= 1 + std::ldexp(1.0, -20);
  Run r64, r64p, r32;
  run(DType::f64, DType::f64, Device::cpu, r64, delta, A);
  run(DType::f64, DType::f64, Device::cpu, r64p, delta_p, A_p);
  run(DType::f32, DType::f32, Device::cpu, r32, delta, A);
  const DType gpu_act = k.bf16 ? DType::bf16 : DType::f32;
  // Every forward variant (threads per channel, see selective_scan_fwd.cu), then the default.
  std::vector<int> variants = k.n <= 16 ? std::vector<int>{4, 8, 0} : std::vector<int>{0};
  Run rg;
  for (int lanes : variants) {
    SCOPED_TRACE("fwd_lanes " + std::to_string(lanes));
    run(gpu_act, DType::f32, Device::cuda, rg, delta, A, lanes);
    auto check = [&](const char* what, Tensor Run::*field, bool activation) {
      const std::vector<double> ref = host_values(r64.*field, false),
                                moved = host_values(r64p.*field, false),
                                naive = host_values(r32.*field, activation && k.bf16),
                                got = download(rg.*field);
      const double tol = 2 * max_err(naive, ref) + max_err(moved, ref) + 1e-6 * max_abs(ref);
      EXPECT_LE(max_err(got, ref), tol) << what << ": naive error " << max_err(naive, ref)
                                        << ", sensitivity " << max_err(moved, ref);
    };
    check("y", &Run::y, true);
    check("final_state", &Run::state, false);
    check("du", &Run::du, true);
    check("ddelta", &Run::ddelta, true);
    if (k.z) check("dz", &Run::dz, true);
    check("dB", &Run::dB, true);
    check("dC", &Run::dC, true);
    check("dA", &Run::dA, false);
    check("dD", &Run::dD, false);
    check("ddelta_bias", &Run::dbias, false);
    check("dinitial_state", &Run::dinit, false);
  }
  // A second run on the same inputs is bit-identical (no order-dependent sums).
  Run again;
  run(gpu_act, DType::f32, Device::cuda, again, delta, A);
  for (Tensor Run::*f : {&Run::y, &Run::du, &Run::ddelta, &Run::dz, &Run::dA, &Run::dB, &Run::dC,
                         &Run::dD, &Run::dbias, &Run::dinit})
    if (k.z || f != &Run::dz) {
      EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
          << (rg.*f).name << " differs between runs";
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuScan,
    ::testing::Values(GpuScanCase{1, 1, 1, 16, 1, false, false, false, true, false},
                      GpuScanCase{1, 37, 130, 16, 1, true, true, true, true, false},
                      GpuScanCase{2, 333, 256, 16, 2, true, true, true, true, true},
                      GpuScanCase{3, 129, 96, 64, 4, true, false, true, true, true},
                      GpuScanCase{1, 200, 64, 32, 1, false, true, false, false, false},
                      GpuScanCase{2, 77, 48, 5, 3, true, true, true, true, true},
                      GpuScanCase{1, 50, 32, 256, 1, true, false, true, true, false},
                      GpuScanCase{4, 1024, 512, 16, 1, true, true, false, true, true},
                      GpuScanCase{2, 300, 64, 16, 2, true, true, true, true, false},
                      GpuScanCase{1, 129, 32, 64, 1, true, false, true, true, true},
                      GpuScanCase{3, 257, 48, 32, 3, false, true, true, true, true}));

}  // namespace
}  // namespace braid
