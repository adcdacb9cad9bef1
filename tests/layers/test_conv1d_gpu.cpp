// Causal conv1d forward and backward on the GPU against the CPU reference (skipped where no GPU
// is visible), plus bit-identical repeat runs.
// Tolerance (DESIGN: kernel error <= 2x the error of a naive same-precision implementation,
// against fp64): the reference runs in f64 (the truth) and in f32 on the same inputs (bf16
// cases: inputs rounded to bf16, outputs rounded to bf16 as a bf16 kernel must); the GPU's
// largest error must be at most twice the naive error plus 1e-6 of the output scale (the GPU
// computes SiLU's sigmoid with ex2.approx and rcp.approx, each within 2^-22 relative, below that
// slack, and sums dw over step groups, 64-step tiles and batch rows in a different order than
// the naive sequential loop, whose error bound is no larger). Documents come every ~10 steps (a
// reset in most windows) or, in the cases marked long, every ~500 steps (most 64-step tiles hold
// one document and take the kernels' unchecked path).
#include <random>

#include "layers/causal_conv1d/causal_conv1d.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct GpuConvCase {
  int64_t b, t, c, w;
  bool docs, init, silu, bias, bf16;
  int doc_every = 10;  // mean document length (long: 500)
};

class GpuConv : public GpuTest<GpuConvCase> {};

TEST_P(GpuConv, ForwardAndBackwardMatchReference) {
  const GpuConvCase k = GetParam();
  const uint64_t seed = std::random_device{}();  // fresh inputs every run; printed on failure
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const bool r = k.bf16;
  const HostTensor x = random_tensor({k.b, k.t, k.c}, -1, 1, r, g),
                   w = random_tensor({k.c, k.w}, -1, 1, r, g),
                   bias = random_tensor({k.c}, -1, 1, r, g),
                   h0 = random_tensor({k.b, k.c, k.w - 1}, -1, 1, r, g),
                   dy = random_tensor({k.b, k.t, k.c}, -1, 1, r, g),
                   dfinal = random_tensor({k.b, k.c, k.w - 1}, -1, 1, r, g);
  // Accumulated (+=) gradients start from these values on every path.
  const HostTensor dw0 = random_tensor({k.c, k.w}, -1, 1, r, g),
                   db0 = random_tensor({k.c}, -1, 1, r, g);
  HostTensor seq{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  std::uniform_int_distribution<int> doc_break(0, k.doc_every - 1);
  for (int64_t i = 0; i < k.b; ++i)
    for (int64_t j = 0, doc = 0; j < k.t; ++j) {
      if (j > 0 && doc_break(g) == 0) ++doc;
      seq.v[i * k.t + j] = double(doc);
    }
  struct Run {
    std::vector<Tensor> keep;
    Conv1dInputs in;
    Tensor y, state, dx, dw, db, dinit, dy, dfinal, ws;
  };
  auto run = [&](DType dt, Device dev, Run& o) {
    o.keep = {make(x, dt, dev, "x"), make(w, dt, dev, "w"), make(bias, dt, dev, "bias"),
              make(seq, DType::i32, dev, "seq"), make(h0, dt, dev, "h0")};
    o.in = Conv1dInputs{&o.keep[0],
                        &o.keep[1],
                        k.bias ? &o.keep[2] : nullptr,
                        k.docs ? &o.keep[3] : nullptr,
                        k.init ? &o.keep[4] : nullptr,
                        k.silu};
    const std::vector<int64_t> btc{k.b, k.t, k.c}, bcw{k.b, k.c, k.w - 1};
    o.y = empty(btc, dt, dev, "y"), o.state = empty(bcw, dt, dev, "state");
    o.dx = empty(btc, dt, dev, "dx"), o.dinit = empty(bcw, dt, dev, "dinit");
    o.dw = make(dw0, dt, dev, "dw"), o.db = make(db0, dt, dev, "db");
    o.dy = make(dy, dt, dev, "dy"), o.dfinal = make(dfinal, dt, dev, "dfinal");
    o.ws =
        empty({std::max<int64_t>(1, causal_conv1d_workspace_elems(o.in))}, DType::f32, dev, "ws");
    if (dev == Device::cuda)  // poison: an unwritten (=) output fails
      for (const Tensor* t : {&o.y, &o.state, &o.dx, &o.dinit, &o.ws})
        gpu_->fill(*t, std::nan(""), {});
    causal_conv1d_forward(o.in, o.y, &o.state);
    causal_conv1d_backward(o.in, o.dy, &o.dfinal,
                           {&o.dx, &o.dw, k.bias ? &o.db : nullptr, &o.dinit}, &o.ws);
  };
  Run r64, r32, rg;
  run(DType::f64, Device::cpu, r64);
  run(DType::f32, Device::cpu, r32);
  const DType dt = k.bf16 ? DType::bf16 : DType::f32;
  run(dt, Device::cuda, rg);
  auto check = [&](const char* what, Tensor Run::*field) {
    const std::vector<double> ref = host_values(r64.*field, false),
                              naive = host_values(r32.*field, k.bf16), got = download(rg.*field);
    const double tol = 2 * max_err(naive, ref) + 1e-6 * max_abs(ref);
    EXPECT_LE(max_err(got, ref), tol) << what << ": naive error " << max_err(naive, ref);
  };
  check("y", &Run::y);
  check("final_state", &Run::state);
  check("dx", &Run::dx);
  check("dw", &Run::dw);
  if (k.bias) check("dbias", &Run::db);
  check("dinitial_state", &Run::dinit);
  Run again;
  run(dt, Device::cuda, again);
  for (Tensor Run::*f : {&Run::y, &Run::state, &Run::dx, &Run::dw, &Run::db, &Run::dinit})
    EXPECT_TRUE(download_bytes(rg.*f) == download_bytes(again.*f))
        << (rg.*f).name << " differs between runs";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuConv,
    ::testing::Values(GpuConvCase{1, 1, 8, 4, false, true, true, true, false},
                      GpuConvCase{1, 2, 16, 4, true, true, true, true, true},
                      GpuConvCase{2, 37, 24, 4, true, true, true, true, true},
                      GpuConvCase{3, 129, 64, 3, true, false, false, true, false},
                      GpuConvCase{1, 200, 13, 2, true, true, true, false, false},
                      GpuConvCase{2, 333, 40, 4, false, true, true, true, true},
                      GpuConvCase{4, 1000, 256, 4, true, true, true, true, true},
                      GpuConvCase{2, 65, 6, 3, true, true, false, true, true},
                      GpuConvCase{2, 300, 200, 4, true, true, true, true, true},
                      GpuConvCase{1, 130, 100, 4, false, false, true, true, false},
                      GpuConvCase{2, 2000, 136, 4, true, true, true, true, true, 500},
                      GpuConvCase{1, 1500, 40, 3, true, false, true, true, false, 500}));

}  // namespace
}  // namespace braid
