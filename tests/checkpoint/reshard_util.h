// Shared by the resharding tests: a small model of every layer type the checkpoints must carry
// (Mamba-2, attention, MoE) and synthetic gradients that differ per rank and step.
#pragma once

#include <cstdint>

#include "layers/model/model.h"

namespace braid::test {

inline ModelConfig reshard_config(bool tie_embeddings = false) {
  ModelConfig c;
  c.pattern = "M*E";
  c.d_model = 16;
  c.vocab_size = 37;
  c.tie_embeddings = tie_embeddings;
  c.mamba2.heads = 4, c.mamba2.head_dim = 8, c.mamba2.d_state = 8, c.mamba2.chunk = 8;
  c.attention = {0, 2, 1, 8, true, 10000.0};
  c.mlp.ffn = 24;
  c.moe.experts = 4, c.moe.top_k = 2, c.moe.ffn = 8;
  return c;
}

inline void fake_grads(ParamSet& params, int rank, int step) {
  for (Param& p : params.all())
    if (p.trainable)
      for (int64_t i = 0; i < p.grad.numel(); ++i)
        p.grad.ptr<float>()[i] = float(((i + 7 * rank + 13 * step) * 37) % 23 - 11) * 1e-3f;
}

}  // namespace braid::test
