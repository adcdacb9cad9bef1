// Mixture of Experts (Mixtral / Jamba sparse MoE; Nemotron-H / DeepSeek-V3 options):
//   logits = gate(x) [M,E]; route = router(logits) (top-k, weights, capacity slots, aux/z losses)
//   y[m]   = sum_k w[m,k] expert_{e_k}(x[m]) + shared_expert(x[m])   (shared expert optional)
// Each expert is a SwiGLU MLP; tokens are permuted into one compact buffer of rows grouped by
// expert (at most M*K rows: the worst case of dropless routing), so each expert runs two dense
// matmuls over its rows. The auxiliary loss aux_coef * aux + z_coef * zloss joins the total loss.
// With balance_bias (sigmoid scores), gate.e_score_correction_bias steers the choice and is
// updated after each optimizer step by the balancing rule (not by gradients).
// Parameters: gate.weight [E,D], gate.e_score_correction_bias [E], experts.{e}.gate_proj.weight
// [F,D], experts.{e}.up_proj.weight [F,D], experts.{e}.down_proj.weight [D,F], shared_expert.*.
// Tensor parallel over tp ranks (expert tensor parallelism, etp = tp): every rank routes every
// token the same way (the router is replicated) and holds F/tp of every expert's (and the shared
// expert's) hidden units, column/row parallel like the MLP; y is summed over the group, and the
// gradients that pass through the partial expert outputs (dx, and the combine weights' before
// the router's backward).
#pragma once

#include <memory>
#include <vector>

#include "layers/blocks/block.h"
#include "layers/blocks/mlp.h"
#include "layers/moe_router/moe_router.h"

namespace braid {

struct MoeConfig {
  int64_t d_model = 0;
  int64_t experts = 8;     // E
  int64_t top_k = 2;       // K
  int64_t ffn = 0;         // F per expert
  int64_t shared_ffn = 0;  // 0: no shared expert
  RouterScore score = RouterScore::softmax;
  bool normalize_topk = false;
  double capacity_factor = 0.0;  // <= 0: dropless
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.0;
  bool balance_bias = false;
  double bias_update_rate = 0.001;
};

class MoeBlock final : public Block {
 public:
  MoeBlock(const MoeConfig& cfg, ParamSet& ps, const std::string& prefix, double init_std,
           double out_std, const TensorParallel& tp = {});
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  double aux_loss() const override { return aux_; }
  double flops_per_token(int64_t seq) const override;
  // Applies the balancing-bias rule with the counts gathered since the last call.
  void after_optimizer_step();
  // Assignments per expert since the last step ([E] i32); data-parallel runs sum them over the
  // group before after_optimizer_step, so every rank updates the bias identically.
  const Tensor& step_counts() const { return step_counts_; }

 private:
  struct Expert {
    Param *gate, *up, *down;
  };
  MoeConfig cfg_;
  TensorParallel tp_;
  int64_t ffn_;  // this rank's hidden units per expert, F/tp
  RouterConfig router_;
  Param* router_w_;
  Param* bias_ = nullptr;
  std::vector<Expert> experts_;
  std::unique_ptr<MlpBlock> shared_;
  int64_t m_ = 0, rows_ = 0, cap_ = 0;
  double aux_ = 0;
  // saved
  Tensor logits_, scores_, expert_, slot_, weight_, counts_, offsets_, row_token_, xe_, ga_, ua_,
      he_, oe_, step_counts_;
  // scratch
  Tensor dweight_, dlogits_, doe_, dhe_, dga_, dua_, dxe_, dxe2_, dx_tmp_, shared_out_;
};

}  // namespace braid
