// Causal self-attention (HF LlamaAttention without biases; JambaAttention when RoPE is off):
//   q = q_proj(x) [B,T,H,P];  k = k_proj(x), v = v_proj(x) [B,T,Hk,P]
//   q, k = rope(q, k, positions) (optional)
//   o = attention(q, k, v, scale 1/sqrt(P), documents masked);  out = o_proj(o)
// Parameters: q_proj.weight [H*P,D], k_proj.weight, v_proj.weight [Hk*P,D], o_proj.weight [D,H*P].
// Tensor parallel over tp ranks (tp divides H and Hk): each rank holds H/tp query heads and the
// Hk/tp KV heads they read (GQA groups stay whole), q/k/v_proj column-parallel, o_proj
// row-parallel; y summed over the group, and dx in backward.
#pragma once

#include "layers/blocks/block.h"

namespace braid {

struct AttentionConfig {
  int64_t d_model = 0;
  int64_t heads = 0;     // H
  int64_t kv_heads = 0;  // Hk
  int64_t head_dim = 0;  // P
  bool rope = true;
  double rope_theta = 10000.0;
};

class AttentionBlock final : public Block {
 public:
  AttentionBlock(const AttentionConfig& cfg, ParamSet& ps, const std::string& prefix,
                 double init_std, double out_std, const TensorParallel& tp = {});
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  double flops_per_token(int64_t seq) const override;

 private:
  AttentionConfig cfg_;
  TensorParallel tp_;
  int64_t h_, hk_;  // this rank's query and KV heads
  int64_t b_ = 0, t_ = 0;
  Param *q_, *k_, *v_, *o_;
  Tensor qt_, kt_, vt_, ot_, lse_;  // saved (q, k after RoPE)
  Tensor dq_, dk_, dv_, do_;        // scratch
  Tensor ws_;                       // scratch: the GPU backward's workspace (empty on the CPU)
};

}  // namespace braid
