// The hybrid language model: a layer pattern of pre-norm residual sub-layers
//   x_0 = embeddings(tokens);  x_{l+1} = x_l + f_l(rmsnorm_l(x_l));  logits = lm_head(norm_f(x_L))
// with f_l chosen by the l-th symbol of the pattern:
//   S Mamba-1 mixer, M Mamba-2 mixer, * attention, - SwiGLU MLP, E MoE, | pipeline stage cut.
// Parameter names: embeddings.weight, layers.{l}.norm.weight, layers.{l}.mixer.*, norm_f.weight,
// lm_head.weight (absent when tied to the embeddings).
// Every divisibility constraint is validated before anything is allocated. Memory is planned once
// for microbatches of [B,T]: a step allocates nothing.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "layers/blocks/attention_block.h"
#include "layers/blocks/block.h"
#include "layers/blocks/mamba1_mixer.h"
#include "layers/blocks/mamba2_mixer.h"
#include "layers/blocks/mlp.h"
#include "layers/blocks/moe.h"
#include "layers/cross_entropy/cross_entropy.h"
#include "layers/linear/linear_cuda.h"
#include "layers/model/params.h"
#include "parallel/rank_grid.h"

namespace braid {

struct ModelConfig {
  std::string pattern;
  int64_t d_model = 0;
  int64_t vocab_size = 0;
  bool tie_embeddings = true;
  double norm_eps = 1e-5;
  double init_std = 0.02;
  Mamba1Config mamba1;  // d_model filled in from the model
  Mamba2Config mamba2;
  AttentionConfig attention;
  MlpConfig mlp;
  MoeConfig moe;
};

// Sub-layer symbols of the pattern with stage cuts removed; throws naming a bad symbol.
std::string pattern_layers(const std::string& pattern);
// Throws a braid::Error naming the first violated constraint.
void validate_model_config(const ModelConfig& cfg);
// Checks a parallel layout against the model: tp must divide every dimension it shards
// (attention heads and KV heads, Mamba-2 heads and groups, Mamba-1 channels, MLP and shared-expert
// widths, the vocabulary), ep the experts, etp the expert width; pp at most the layers, and equal
// to the number of stages when the pattern cuts them with '|'. The error names the constraint and
// the values that would work.
void validate_layout_for_model(const ModelConfig& cfg, const Layout& layout);

struct Batch {
  Tensor tokens;     // [B,T] i32
  Tensor targets;    // [B,T] i32, -1 = no loss
  Tensor seq_idx;    // [B,T] i32
  Tensor positions;  // [B,T] i32
};

// Activation recompute: blocks whose saved activations are not kept from the forward to the
// backward (they share one region), and are recomputed from their input before their backward.
enum class Recompute { none, ssm, full };         // ssm: the Mamba-1 and Mamba-2 mixers; full: all
Recompute parse_recompute(const std::string& s);  // "none", "ssm", "full"; else a named error

struct MemoryReport {
  size_t parameters = 0, gradients = 0, activations = 0, scratch = 0;
};

class Model {
 public:
  // pad_elems: the parameter and gradient arenas hold a multiple of this many elements (the
  // data-parallel size, for ZeRO-1 shards).
  // tp: the tensor-parallel group every block, the embedding and the output projection are
  // split over (vocabulary-parallel, as Megatron-LM; MoE experts over the same ranks).
  // cp: the context-parallel group; the model then holds shard cp.rank() of every sequence (seq
  // is the shard's length; the batch's seq_idx numbers documents over the whole sequence and its
  // positions count from each document's start).
  // ep: the expert-parallel group (each rank holds E/ep experts of every MoE layer, in parameter
  // region 1, padded to a multiple of expert_pad_elems: the expert-data-parallel size).
  // stage: the pipeline stage this rank runs, of those whose first layers are `starts`
  // (stage_starts; {0}: one stage). The first stage holds the embeddings, the last the final norm
  // and output projection, and with tied embeddings a mirror of the embedding table.
  // dtype: of the activations; bf16 is mixed precision (f32 parameters and gradients, bf16
  // compute copies of the weights; GPU only).
  Model(const ModelConfig& cfg, DType dtype, Backend& backend, int64_t batch, int64_t seq,
        int64_t pad_elems = 1, const TensorParallel& tp = {}, Communicator* cp = nullptr,
        Communicator* ep = nullptr, int64_t expert_pad_elems = 1, int stage = 0,
        const std::vector<int64_t>& starts = {0}, Recompute recompute = Recompute::none,
        int activation_slots = 1);
  // The first layer of each of `stages` pipeline stages: the pattern's '|' cuts; else, given
  // per-layer costs (layer_costs), the contiguous cut with the least expensive slowest stage;
  // else as even as the layer count allows (stage s starts at s L / stages).
  static std::vector<int64_t> stage_starts(const ModelConfig& cfg, int stages,
                                           const std::vector<double>& costs = {});
  // Measured seconds of one forward + backward of each layer of the pattern on a [batch, seq]
  // microbatch (one process, in `dtype` on `backend`): per layer type, a two-layer model's time
  // less a one-layer model's, best of a few runs; the last layer's also counts the model's ends
  // (embedding, final norm, logits and loss), which the pipeline's last stage mostly carries.
  static std::vector<double> layer_costs(const ModelConfig& cfg, Backend& backend, DType dtype,
                                         int64_t batch, int64_t seq);

  void initialize(uint64_t seed) { params_.initialize(seed); }
  // Forward and backward of one microbatch; gradients accumulate. grad_scale multiplies the
  // gradient of the summed token losses (1 / tokens of the whole step); aux_scale multiplies
  // the gradient of the auxiliary losses (1 / microbatches of the step).
  struct StepResult {
    LossSum loss;
    double aux = 0;
  };
  // A pipeline stage after the first reads its input activations from `input` ([B T, D] rows,
  // this rank's under sequence parallelism) and returns their gradient in `input_grad`; a stage
  // before the last takes its output's gradient from `output_grad`, and its loss is 0.
  StepResult forward_backward(const Batch& batch, double grad_scale, double aux_scale,
                              const Tensor* input = nullptr, const Tensor* output_grad = nullptr,
                              const Tensor* input_grad = nullptr);
  // Called during forward_backward's backward (when set) with x as the gradients at flat offset x
  // and above become final for this microbatch: after each layer, and 0 after the embeddings (a
  // data-parallel run sums the finished ones while the backward goes on: GradBuckets).
  void set_grads_ready(std::function<void(int64_t)> f) { grads_ready_ = std::move(f); }
  // A pipeline stage before the last: the forward of a microbatch (its output is then
  // stage_output()), and later, with the same activation slot in use, its backward.
  void forward_for_backward(const Batch& batch, double aux_scale, const Tensor* input = nullptr);
  StepResult backward_after_forward(const Batch& batch, double grad_scale, double aux_scale,
                                    const Tensor* output_grad, const Tensor* input_grad = nullptr);
  // Activation slots: the saved activations of `activation_slots` microbatches, one in use at a
  // time (a pipeline stage holds every microbatch it has run forward and not yet backward). Every
  // forward and backward reads and writes the slot in use; the held-out loss may use any.
  void use_activations(int slot);
  int activation_slots() const { return slots_; }
  const Tensor& stage_output() const { return resid_.back(); }
  // The held-out loss (0 on stages before the last; their output is then stage_output()).
  LossSum evaluate(const Batch& batch, const Tensor* input = nullptr);
  bool first_stage() const { return first_; }
  bool last_stage() const { return last_; }
  // The embedding table (first stage, and the last one's mirror with tied embeddings), or null.
  Param* embeddings() { return embed_; }
  // Under sequence parallelism, sums the gradients of the norm weights (each rank saw its rows)
  // over the tensor-parallel group: once per step, after the last microbatch.
  void reduce_sequence_parallel_grads();
  // Rule-based updates after the optimizer step (MoE balancing bias).
  void after_optimizer_step();
  // The MoE per-expert assignment counts of this step, one [E] i32 tensor per MoE layer (to be
  // summed over data-parallel ranks before after_optimizer_step).
  std::vector<Tensor> moe_step_counts() const;

  ParamSet& params() { return params_; }
  // The parameters other pipeline stages and expert-parallel ranks hold.
  const std::vector<RemoteParam>& remote_params() const { return remote_; }
  const ModelConfig& config() const { return cfg_; }
  MemoryReport memory() const;
  // Model FLOPs (forward + backward) per token at sequence length seq.
  double flops_per_token(int64_t seq) const;
  int64_t batch() const { return b_; }
  int64_t seq() const { return t_; }

 private:
  BatchMeta step_meta(const Batch& batch, double aux_scale) const;
  void forward(const Batch& batch, const BatchMeta& meta, const Tensor* input = nullptr);
  StepResult backward(const Batch& batch, const BatchMeta& meta, double grad_scale,
                      const Tensor* output_grad, const Tensor* input_grad);
  // Takes every activation and scratch tensor of the model and its blocks from sv and sc.
  void plan_activations(Arena& sv, Arena& sc);
  // The output projection and the loss of the last forward, over row chunks of the logits; with
  // dfinal, the loss's gradient with respect to the final norm's output (partial over the tp
  // ranks) into dfinal, and the projection's weight gradient.
  // On the GPU the loss is read from the rows' losses (a wait) when `read`, else left in row_loss_
  // for forward_backward to read at its end.
  LossSum head(const Batch& batch, double grad_scale, const Tensor* dfinal, bool read = true);

  ModelConfig cfg_;
  Backend* backend_;
  TensorParallel tp_;
  Communicator* cp_ = nullptr;
  bool sp_ = false;  // sequence parallel: the residual stream is split by rows
  std::function<void(int64_t)> grads_ready_;  // set_grads_ready
  int64_t vocab_start_ = 0;                   // this rank's first vocabulary row
  std::string layers_;
  bool first_ = true, last_ = true;  // pipeline stage
  int64_t layer0_ = 0;               // the stage's first layer
  DType act_dtype_;                  // of the activations
  int64_t b_, t_;
  ParamSet params_;
  std::vector<RemoteParam> remote_;
  Param *embed_ = nullptr, *head_ = nullptr, *norm_f_ = nullptr;
  std::vector<Param*> norms_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<bool> recompute_;  // per block of this stage
  std::vector<MoeBlock*> moe_blocks_;
  // state_: the blocks' persistent state (plan_state); saved_: slots_ slots of slot_bytes_, slot_
  // in use; scratch_: one microbatch's.
  Arena state_, saved_, scratch_;
  int slots_ = 1, slot_ = 0;
  size_t slot_bytes_ = 0;
  // saved: residual stream inputs x_l [L+1][M_r,D], normed inputs, RMS scales (M_r = M, or
  // M / tp rows under sequence parallelism), final norm [M,D] (final_local_: this rank's rows)
  std::vector<Tensor> resid_, normed_, rstd_;
  Tensor final_normed_, final_rstd_, final_local_;
  // scratch: logits_ [head_rows_,V/tp]; dresid_, dnormed_, dtmp_ [M_r,D]; fout_ [B,T,D]; under
  // sequence parallelism xfull_, dxfull_ [B,T,D] (a block's gathered input, its input gradient);
  // the norms' and the embedding's backward workspaces; GPU: row_loss_ [M,2] (each row's loss,
  // saved: read at the end of forward_backward) and, vocabulary-parallel, ce_stats_ (the head's
  // row statistics, f32 [4, head rows])
  Tensor logits_, dresid_, dnormed_, dtmp_, fout_, xfull_, dxfull_, norm_ws_, embed_ws_, row_loss_,
      ce_stats_;
  int64_t head_rows_ = 0;  // rows of a logits chunk
  // GPU: the cuBLASLt handle and workspace of every linear layer (null on the CPU)
  std::unique_ptr<GemmContext> gemm_;
};

}  // namespace braid
