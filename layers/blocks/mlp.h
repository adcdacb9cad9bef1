// SwiGLU MLP (HF LlamaMLP): y = down_proj(silu(gate_proj(x)) * up_proj(x)).
//   gate_proj, up_proj [F,D]; down_proj [D,F]; x, y [B,T,D]; hidden [B*T,F].
// Tensor parallel over tp ranks: gate_proj and up_proj column-parallel (rows F/tp), down_proj
// row-parallel (columns F/tp); y summed over the group, and dx in backward.
#pragma once

#include "layers/blocks/block.h"

namespace braid {

struct MlpConfig {
  int64_t d_model = 0;
  int64_t ffn = 0;
};

class MlpBlock final : public Block {
 public:
  MlpBlock(const MlpConfig& cfg, ParamSet& ps, const std::string& prefix, double init_std,
           double out_std, const TensorParallel& tp = {});
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  double flops_per_token(int64_t) const override { return 6.0 * 3 * cfg_.d_model * cfg_.ffn; }

 private:
  MlpConfig cfg_;
  TensorParallel tp_;
  int64_t ffn_;  // this rank's hidden width F/tp
  Param *gate_, *up_, *down_;
  Tensor a_, b_, h_;     // saved [M,F]: gate and up pre-activations, hidden
  Tensor da_, db_, dh_;  // scratch
};

}  // namespace braid
