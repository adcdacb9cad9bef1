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
// Expert parallel over ep ranks (ep divides E; each rank with its own tokens): a rank holds the
// E/ep experts [r E/ep, (r+1) E/ep) and routes its tokens as usual; the rows for other ranks'
// experts go there in one all-to-all-v (and the per-expert row counts in another), each rank runs
// its experts over the rows it received, and a second all-to-all-v brings the outputs back to the
// tokens' ranks (backward: the same exchanges for the gradients). Expert weights' gradients are
// complete on their rank; everything else is data parallel as before.
// Precision: the token rows and the experts run in the compute dtype; the router (logits, scores,
// weights and their gradients) too, or f32 under mixed precision (bf16 compute on the GPU). On the
// GPU the routing plan's offsets are read back to the host once per forward (the expert GEMMs are
// sized there).
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
           double out_std, const TensorParallel& tp = {}, Communicator* ep = nullptr);
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void plan_state(Arena& state) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  // The last forward's auxiliary losses, coefficients applied (GPU: read from the device here,
  // so that the forward does not wait for them).
  double aux_loss() const override;
  // The dispatch plan (rows per expert on the host) and the expert-parallel row counts.
  bool forward_state_on_host() const override { return true; }
  double flops_per_token(int64_t seq) const override;
  // Applies the balancing-bias rule with the counts gathered since the last call.
  void after_optimizer_step();
  // Assignments per expert since the last step ([E] i32); data-parallel runs sum them over the
  // group before after_optimizer_step, so every rank updates the bias identically.
  const Tensor& step_counts() const { return step_counts_; }
  // Under expert parallelism, the expert weights the other ranks hold (whole-tensor names).
  std::vector<RemoteParam> remote_params() const;

 private:
  struct Expert {
    Param *gate, *up, *down;
  };
  // Rows [r0, r0 + n) of the expert-side buffers go through local expert e.
  struct Segment {
    int64_t r0, n;
    int e;
  };
  std::vector<Segment> segments() const;
  // Expert forward / backward over the expert-side rows (xe_ or the rows received).
  void experts_forward(const Tensor& x_rows, const Tensor& out_rows, const GemmContext* gemm);
  void experts_backward(const Tensor& x_rows, const Tensor& dout_rows, const Tensor& dx_rows,
                        const GemmContext* gemm);
  // Expert parallel: the rows per local expert every rank sends this one (forward, after the
  // routing), then rows from the tokens' order to the experts' ranks, or back.
  void exchange_counts();
  void to_experts(const Tensor& rows, const Tensor& recv);
  void from_experts(const Tensor& recv, const Tensor& rows);
  MoeConfig cfg_;
  std::string prefix_;
  TensorParallel tp_;
  Communicator* ep_;
  int64_t e0_ = 0, local_ = 0;  // first expert on this rank, experts on this rank
  int64_t ffn_;                 // this rank's hidden units per expert, F/tp
  RouterConfig router_;
  Param* router_w_;
  Param* bias_ = nullptr;
  std::vector<Expert> experts_;
  std::unique_ptr<MlpBlock> shared_;
  int64_t m_ = 0, rows_ = 0, cap_ = 0;
  double aux_ = 0;                     // CPU: the last forward's auxiliary losses
  Tensor loss_sums_;                   // GPU: the router's loss sums, f64 [2] (saved)
  std::vector<int32_t> host_offsets_;  // offsets_ on the host (the plan's)
  // saved
  Tensor logits_, scores_, expert_, slot_, weight_, counts_, offsets_, row_token_, xe_, ga_, ua_,
      he_, oe_, step_counts_;
  // expert parallel: rows each peer sends and this rank receives, per peer (elements D each) and
  // per (peer, local expert); xr_, or_ [ep M K, D] the rows at the experts (saved)
  std::vector<int64_t> send_rows_, recv_rows_, recv_expert_rows_;
  Tensor xr_, or_;
  // scratch (router_ws_: the GPU router's loss sums; dlogits_c_: dlogits in the compute dtype for
  // the gate's GEMM, when that is not f32; ep_counts_: the row counts the ep ranks exchange)
  Tensor dor_, dxr_, dweight_, dlogits_, dlogits_c_, router_ws_, doe_, dhe_, dga_, dua_, dxe_,
      dx_tmp_, shared_out_, ep_counts_;
};

}  // namespace braid
