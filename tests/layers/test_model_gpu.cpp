// The whole model on the GPU in mixed precision (bf16 activations and weight copies, f32
// parameters and gradients) against the same model on the CPU in f32: the loss and every
// parameter's gradient after one forward + backward, for patterns of Mamba-2, attention and MLP
// layers, of Mamba-1 (with the dt/B/C norms), MLP and attention, and of both with MoE layers
// (softmax router; sigmoid router with normalised top-k and the balancing bias), with packed
// documents and a length that is no multiple of the SSD chunk or the attention tiles. The GPU
// router computes in f32 from bf16 activations, so a token whose K-th and (K+1)-th scores lie
// within that rounding (a chance of about 2^-9 per token) may choose another expert than on the
// CPU. Such a token's gradient term replaces another; the n ~ M K / E = 200 terms of an expert's
// gradient add up like random vectors, so k moved terms change it by about sqrt(k / n) (7% for
// one), and they reach the layers below through the input gradient (measured: up to 13% for an
// expert, 11% for a router, 8% for the norm below). The experts' and routers' gradients are held
// to 2^-2 (up to 12 moved tokens per expert), the others to the 2^-3 below. Also: two GPU runs are
// bit-identical, and a step allocates nothing. Tolerance: every activation and weight a kernel
// reads is rounded to bf16 (relative error u = 2^-9), once per op. An error of a few u per op, over
// the ~10 ops a layer applies and the 5 layers plus the head, stays within 2^-6 of the loss
// (measured: 2.8e-5 relative); a gradient tensor's relative L2 error is bounded by the same
// argument per op along the backward path, which is about twice as long and divides by small
// gradient norms: 2^-3. The dt biases' and A_log gradients are per-head (Mamba-1: per-channel) sums
// over every token of terms that cancel (their sum is much smaller than the terms), so the terms'
// bf16 error is amplified by that ratio: 2^-1 for them (measured: 0.16 for the first layer's dt
// bias). A missing, doubled or sign-flipped contribution still gives a relative error of 1 or more.
// The same model on the GPU in f32 (train.precision = fp32: every op's f32 path, SSD and attention
// by their step-by-step kernels) differs from the CPU only in the order of f32 sums: an op's
// output of K terms moves by about sqrt(K) 2^-24 of their magnitudes (K <= T N = 12800 here:
// 2^-17.2), over the ~20 ops of the backward path: 2^-13 for a gradient, 2^-16 for the loss; the
// cancelling sums above amplify it about ten times (their bf16 ratio): 2^-9. The routing then
// agrees too (a near-tie within 2^-17 of the scores is about 2^-8 likely over the test's tokens).
#include <cmath>

#include "layers/model/model.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

ModelConfig gpu_config(const std::string& pattern) {
  ModelConfig c;
  c.pattern = pattern;
  c.d_model = 128;
  c.vocab_size = 512;
  c.init_std = 0.05;
  c.mamba2.heads = 4, c.mamba2.head_dim = 64, c.mamba2.groups = 2, c.mamba2.d_state = 64;
  c.mamba2.d_conv = 4, c.mamba2.chunk = 64;
  c.attention = {0, 4, 2, 64, true, 10000.0};
  c.mlp.ffn = 256;
  c.mamba1.d_inner = 256, c.mamba1.d_state = 16, c.mamba1.dt_rank = 8, c.mamba1.d_conv = 4;
  c.mamba1.dt_bc_norm = true;
  c.moe.experts = 4, c.moe.top_k = 2, c.moe.ffn = 128, c.moe.aux_loss_coef = 0.01;
  c.moe.z_loss_coef = 0.001;
  if (pattern.find('S') != std::string::npos)  // the sigmoid router with its balancing bias
    c.moe.score = RouterScore::sigmoid, c.moe.normalize_topk = true, c.moe.balance_bias = true;
  return c;
}

struct GpuModelCase {
  std::string pattern;
  bool f32 = false;
};
class GpuModel : public GpuTest<GpuModelCase> {};

TEST_P(GpuModel, MatchesCpuAndRepeats) {
  const GpuModelCase c = GetParam();
  const ModelConfig cfg = gpu_config(c.pattern);
  const int loss_tol = c.f32 ? -16 : -6, grad_tol = c.f32 ? -13 : -3, cancel_tol = c.f32 ? -9 : -1;
  const int64_t b = 2, t = 200;
  HostTensor tok{{b, t}, {}}, tgt{{b, t}, {}}, seq{{b, t}, {}}, pos{{b, t}, {}};
  for (int64_t i = 0; i < b; ++i) {
    int doc = 0, start = 0;
    for (int64_t j = 0; j < t; ++j) {
      if (j > 0 && (j * 7 + i) % 53 == 0) ++doc, start = int(j);  // packed documents
      tok.v.push_back(double((j * 131 + i * 17 + 3) % cfg.vocab_size));
      tgt.v.push_back(j % 37 == 5 ? -1.0 : double((j * 29 + i * 5 + 1) % cfg.vocab_size));
      seq.v.push_back(doc);
      pos.v.push_back(double(j - start));
    }
  }
  auto batch_on = [&](Device dev) {
    return Batch{make(tok, DType::i32, dev, "tokens"), make(tgt, DType::i32, dev, "targets"),
                 make(seq, DType::i32, dev, "seq_idx"), make(pos, DType::i32, dev, "positions")};
  };
  const Batch host_batch = batch_on(Device::cpu), gpu_batch = batch_on(Device::cuda);
  const double gs = 1.0 / double(b * t);
  auto cpu_backend = make_cpu_backend();
  Model ref(cfg, DType::f32, *cpu_backend, b, t);
  ref.initialize(5);
  ref.params().zero_grads();
  const LossSum lr = ref.forward_backward(host_batch, gs, 1.0).loss;

  Model gpu(cfg, c.f32 ? DType::f32 : DType::bf16, *gpu_, b, t);
  gpu.initialize(5);
  auto run = [&] {
    gpu.params().zero_grads();
    const LossSum l = gpu.forward_backward(gpu_batch, gs, 1.0).loss;
    gpu_->synchronize({});
    return l;
  };
  const LossSum lg = run();
  ASSERT_EQ(lg.count, lr.count);
  const double loss_ref = lr.sum / double(lr.count), loss_gpu = lg.sum / double(lg.count);
  EXPECT_LE(std::fabs(loss_gpu - loss_ref), std::ldexp(loss_ref, loss_tol))
      << "loss " << loss_gpu << " vs CPU " << loss_ref;
  std::printf("loss: GPU %.6f, CPU %.6f (relative difference %.2e)\n", loss_gpu, loss_ref,
              std::fabs(loss_gpu - loss_ref) / loss_ref);
  std::vector<std::vector<double>> grads;
  double worst = 0;
  for (const Param& p : gpu.params().all()) {
    if (!p.trainable) continue;  // the MoE balancing bias: no gradient
    const Param* q = ref.params().find(p.name);
    ASSERT_NE(q, nullptr) << p.name;
    const std::vector<double> g = download(p.grad), want = host_values(q->grad, false);
    double num = 0, den = 0;
    for (size_t i = 0; i < g.size(); ++i) num += (g[i] - want[i]) * (g[i] - want[i]);
    for (double v : want) den += v * v;
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    const bool cancelling = p.name.ends_with("dt_bias") || p.name.ends_with("A_log") ||
                            p.name.ends_with("dt_proj.bias");
    const bool routed = !c.f32 && (p.name.find(".experts.") != std::string::npos ||
                                   p.name.ends_with(".gate.weight"));
    EXPECT_LE(rel, std::ldexp(1.0, cancelling ? cancel_tol
                                   : routed   ? -2
                                              : grad_tol))
        << p.name << ": relative L2 error of the gradient";
    if (!cancelling) worst = std::max(worst, rel);
    std::printf("%-40s relative L2 error %.2e\n", p.name.c_str(), rel);
    grads.push_back(g);
  }
  std::printf("largest relative L2 gradient error (not dt bias or A_log): %.2e\n", worst);

  // Again, with the same inputs: bit-identical, and nothing allocated.
  const int64_t allocs = gpu_->allocation_count();
  const LossSum again = run();
  EXPECT_EQ(gpu_->allocation_count(), allocs) << "a step allocated device memory";
  EXPECT_EQ(again.sum, lg.sum);
  size_t k = 0;
  for (const Param& p : gpu.params().all()) {
    if (!p.trainable) continue;
    const std::vector<double> g = download(p.grad);
    EXPECT_EQ(g, grads[k]) << p.name << ": gradients differ between two identical runs";
    ++k;
  }
}

INSTANTIATE_TEST_SUITE_P(Hybrid, GpuModel,
                         ::testing::Values(GpuModelCase{"M*-M-"}, GpuModelCase{"S-*S-"},
                                           GpuModelCase{"M*EME"}, GpuModelCase{"SE*S-"},
                                           GpuModelCase{"M*-M-", true},
                                           GpuModelCase{"SE*ME", true}));

}  // namespace
}  // namespace braid
