// Data parallel with ZeRO-1 against the single-rank run (under mpirun with P ranks): every rank
// trains on its slice of a global batch of P samples with Zero1AdamW, and also runs the
// single-rank reference (the whole batch, plain AdamW) locally. Checked after each of 3 steps:
// the global loss, the reduced gradient shard (first step) and every parameter.
// Tolerances: the two runs differ only in how f32 sums are associated (per-rank partial sums
// added by MPI versus one pass), a relative error of order n eps ~ 1e-6 for the few hundred terms
// here, so step 1 (same parameters) must agree to 1e-5 in loss, gradient norm and every reduced
// gradient element (relative to the largest). Adam then maps a gradient difference dg to an
// update difference of at most lr dg / eps (its slope at g ~ 0): with Adam eps = 1e-3, lr = 1e-3
// and dg <= 1e-5 (|g| <= 1 after clipping) that is 1e-5 per step, so parameters must agree to
// 1e-4 after 3 steps, and the later losses and norms (computed from those parameters) to 1e-4
// and 1e-3 relative. MoE auxiliary losses are per microbatch by definition (their value depends
// on which tokens share the microbatch), so this test sets their coefficients to 0; the routing
// itself (dropless) is exercised.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "layers/model/model.h"
#include "optim/adamw.h"
#include "optim/zero1_adamw.h"
#include "parallel/communicator.h"

namespace {

using namespace braid;

ModelConfig config() {
  ModelConfig c;
  c.pattern = "S-M*E";
  c.d_model = 16;
  c.vocab_size = 37;
  c.mamba1 = {0, 32, 4, 2, 4, 1, false, 1e-6, 0.01, 0.1};
  c.mamba2.heads = 4, c.mamba2.head_dim = 8, c.mamba2.d_state = 8, c.mamba2.chunk = 8;
  c.attention = {0, 2, 1, 8, true, 10000.0};
  c.mlp.ffn = 24;
  c.moe.experts = 4, c.moe.top_k = 2, c.moe.ffn = 8, c.moe.aux_loss_coef = 0, c.moe.z_loss_coef = 0;
  return c;
}

// Sample s of the global batch, T tokens + targets + documents, the same on every rank.
void fill_sample(int64_t s, int64_t t, int64_t row, const Batch& b, int64_t vocab) {
  for (int64_t j = 0; j < t; ++j) {
    const int64_t i = row * t + j;
    b.tokens.ptr<int32_t>()[i] = int32_t((s * 131 + j * 17 + j * j) % vocab);
    b.targets.ptr<int32_t>()[i] = int32_t((s * 7 + j * 29 + 3) % vocab);
    b.seq_idx.ptr<int32_t>()[i] = int32_t(j >= 10);
    b.positions.ptr<int32_t>()[i] = int32_t(j >= 10 ? j - 10 : j);
  }
}

struct HostBatch {
  std::vector<int32_t> tok, tgt, seq, pos;
  Batch batch;
  HostBatch(int64_t b, int64_t t) : tok(b * t), tgt(b * t), seq(b * t), pos(b * t) {
    auto v = [&](std::vector<int32_t>& x, const char* n) {
      return Tensor::contiguous_view(x.data(), DType::i32, Device::cpu, {b, t}, n);
    };
    batch = {v(tok, "tokens"), v(tgt, "targets"), v(seq, "seq_idx"), v(pos, "positions")};
  }
};

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  const int p = world->size(), r = world->rank();
  const int64_t t = 24;
  const double lr = 1e-3, scale = 1.0 / double(p * t);
  AdamWConfig acfg;
  acfg.eps = 1e-3;
  int failures = 0;
  double worst_loss = 0, worst_param = 0;
  auto expect = [&](bool ok, const char* what, double got, double tol) {
    if (!ok)
      ++failures, std::fprintf(stderr, "rank %d: FAILED %s (%.3g > %.3g)\n", r, what, got, tol);
  };
  try {
    auto backend = make_cpu_backend();
    // Data parallel: this rank's sample, ZeRO-1 over the world.
    Model dp_model(config(), DType::f32, *backend, 1, t, p);
    dp_model.initialize(7);
    Zero1AdamW zero(dp_model.params(), acfg, *backend, *world);
    HostBatch mine(1, t);
    fill_sample(r, t, 0, mine.batch, config().vocab_size);
    // Reference: the whole batch on this rank.
    Model ref_model(config(), DType::f32, *backend, p, t);
    ref_model.initialize(7);
    AdamW ref_opt(ref_model.params(), acfg, *backend);
    HostBatch all(p, t);
    for (int s = 0; s < p; ++s) fill_sample(s, t, s, all.batch, config().vocab_size);
    for (int step = 0; step < 3; ++step) {
      dp_model.params().zero_grads();
      const auto local = dp_model.forward_backward(mine.batch, scale, 1.0);
      std::vector<double> loss{local.loss.sum};
      world->all_reduce(Tensor::contiguous_view(loss.data(), DType::f64, Device::cpu, {1}, "loss"),
                        ReduceOp::sum);
      zero.reduce_gradients();
      const double norm = zero.grad_norm();
      ref_model.params().zero_grads();
      const auto ref = ref_model.forward_backward(all.batch, scale, 1.0);
      const double ref_norm = ref_opt.grad_norm();
      const double dl = std::abs(loss[0] - ref.loss.sum) / std::abs(ref.loss.sum);
      const double loss_tol = step == 0 ? 1e-5 : 1e-4, norm_tol = step == 0 ? 1e-5 : 1e-3;
      expect(dl <= loss_tol, "global loss equals the single-rank loss", dl, loss_tol);
      worst_loss = std::max(worst_loss, dl);
      const double dn = std::abs(norm - ref_norm) / ref_norm;
      expect(dn <= norm_tol, "gradient norm", dn, norm_tol);
      if (step == 0) {
        // This rank's reduced gradient shard against the same elements of the reference.
        const float* full = ref_model.params().flat_grads().ptr<float>() + zero.shard_begin();
        double gmax = 0, dmax = 0;
        for (int64_t i = 0; i < zero.shard_size(); ++i) {
          gmax = std::max(gmax, double(std::abs(full[i])));
          dmax = std::max(dmax, double(std::abs(full[i] - zero.shard_grad()[i])));
        }
        expect(dmax <= 1e-5 * gmax, "reduced gradient shard", dmax, 1e-5 * gmax);
      }
      zero.step(lr, norm);
      ref_opt.step(lr, ref_norm);
    }
    const Tensor a = dp_model.params().flat_values(), b = ref_model.params().flat_values();
    double dmax = 0;
    for (int64_t i = 0; i < a.numel() && i < b.numel(); ++i)
      dmax = std::max(dmax, double(std::abs(a.ptr<float>()[i] - b.ptr<float>()[i])));
    expect(dmax <= 1e-4, "parameters after 3 steps", dmax, 1e-4);
    worst_param = dmax;
    // Every rank holds the same parameters (the all-gather).
    std::vector<float> mine_first{a.ptr<float>()[0]}, firsts(p);
    world->all_gather(
        Tensor::contiguous_view(mine_first.data(), DType::f32, Device::cpu, {1}, "p0"),
        Tensor::contiguous_view(firsts.data(), DType::f32, Device::cpu, {p}, "p0s"));
    for (int q = 0; q < p; ++q)
      expect(firsts[q] == firsts[0], "parameters equal on every rank", 0, 0);
  } catch (const Error& e) {
    std::fprintf(stderr, "rank %d: braid: error: %s\n", r, e.what());
    ++failures;
  }
  std::vector<int32_t> f{failures};
  world->all_reduce(Tensor::contiguous_view(f.data(), DType::i32, Device::cpu, {1}, "failures"),
                    ReduceOp::sum);
  if (r == 0)
    std::printf(
        "ZeRO-1 over %d ranks vs single rank: %s (largest relative loss difference %.2e, largest "
        "parameter difference after 3 steps %.2e)\n",
        p, f[0] ? "FAILED" : "equal within tolerance", worst_loss, worst_param);
  return f[0] ? 1 : 0;
}
