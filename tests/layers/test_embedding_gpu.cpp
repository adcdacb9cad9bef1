// Embedding forward and backward on the GPU against the CPU reference (skipped where no GPU is
// visible), whole and vocabulary-parallel (this rank's rows only), with repeated tokens, plus
// bit-identical repeat runs. The forward copies rows: equal to the reference exactly. The
// backward sums each row's dy rows in position order in f32 (as a naive f32 loop does) and adds
// the sum to dW: within 2x the naive f32 error against f64, plus 1e-6 of the scale.
#include <cmath>
#include <random>

#include "layers/embedding/embedding.h"
#include "runtime/backend.h"
#include "tests/gpu_test_util.h"

namespace braid {
namespace {

struct EmbedCase {
  int64_t b, t, vocab, d, v0, rows;  // W holds rows [v0, v0 + rows) of the vocabulary
  bool bf16;
};

class GpuEmbedding : public GpuTest<EmbedCase> {};

TEST_P(GpuEmbedding, ForwardAndBackwardMatchReference) {
  const EmbedCase k = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  HostTensor tok{{k.b, k.t}, std::vector<double>(k.b * k.t)};
  // Few distinct ids (many repeats), some outside this rank's rows.
  std::uniform_int_distribution<int64_t> pick(0, std::min<int64_t>(k.vocab - 1, 40));
  for (double& v : tok.v) v = double(pick(g) * (k.vocab / 41 + 1) % k.vocab);
  const HostTensor w = random_tensor({k.rows, k.d}, -1, 1, k.bf16, g),
                   dy = random_tensor({k.b, k.t, k.d}, -1, 1, k.bf16, g),
                   dw0 = random_tensor({k.rows, k.d}, -1, 1, k.bf16, g);
  struct Run {
    Tensor tok, w, y, dy, dw, ws;
  };
  const int64_t vocab = k.v0 == 0 && k.rows == k.vocab ? 0 : k.vocab;
  auto run = [&](DType dt, Device dev, Run& r) {
    r.tok = make(tok, DType::i32, dev, "tokens"), r.w = make(w, dt, dev, "W");
    r.dy = make(dy, dt, dev, "dy"), r.dw = make(dw0, dt, dev, "dW");
    r.y = empty({k.b, k.t, k.d}, dt, dev, "y");
    const int64_t wb = std::max<int64_t>(embedding_workspace_bytes(r.tok, k.rows), 1);
    r.ws = empty({wb}, DType::u8, dev, "ws");
    if (dev == Device::cuda) gpu_->fill(r.y, std::nan(""), {});
    embedding_forward(r.tok, r.w, r.y, k.v0, vocab);
    embedding_backward(r.tok, r.dy, r.dw, k.v0, vocab, dev == Device::cuda ? &r.ws : nullptr);
  };
  Run r64, r32, rg, again;
  run(DType::f64, Device::cpu, r64);
  run(DType::f32, Device::cpu, r32);
  const DType dt = k.bf16 ? DType::bf16 : DType::f32;
  run(dt, Device::cuda, rg);
  EXPECT_EQ(max_err(download(rg.y), host_values(r64.y, false)), 0.0) << "y";
  const std::vector<double> ref = host_values(r64.dw, false), naive = host_values(r32.dw, k.bf16),
                            got = download(rg.dw);
  EXPECT_LE(max_err(got, ref), 2 * max_err(naive, ref) + 1e-6 * max_abs(ref))
      << "dW: naive error " << max_err(naive, ref);
  run(dt, Device::cuda, again);
  EXPECT_TRUE(download_bytes(rg.dw) == download_bytes(again.dw)) << "dW differs between runs";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuEmbedding,
                         ::testing::Values(EmbedCase{2, 150, 1000, 64, 0, 1000, false},
                                           EmbedCase{4, 300, 1000, 96, 200, 300, true},
                                           EmbedCase{1, 1, 50, 8, 0, 50, true},
                                           EmbedCase{8, 512, 32000, 512, 16000, 16000, true}));

}  // namespace
}  // namespace braid
