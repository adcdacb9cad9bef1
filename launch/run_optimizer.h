// The optimizer of a training run over any layout, and its checkpoint state.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "layers/model/params.h"
#include "optim/adamw.h"
#include "optim/zero1_adamw.h"
#include "parallel/communicator.h"

namespace braid {

// The optimizer of a run: AdamW on one process, ZeRO-1 AdamW over the data-parallel group.
// Under expert parallelism the expert weights (parameter region 1) get their own ZeRO-1 over the
// expert-data-parallel group, and the global gradient norm adds both regions (the experts' summed
// over the expert-parallel ranks, which hold different experts). Checkpoints hold the state in
// logical (unsharded) coordinates either way: a process writes it whole, ZeRO-1 ranks each write
// their runs of it; either layout resumes from either.
class RunOptimizer {
 public:
  // Several ranks (dp and tp groups given) always run ZeRO-1, even over a dp group of one: its
  // checkpoints are the sharded ones, which tensor-parallel shards need. edp and ep: the
  // expert-data-parallel and expert-parallel groups (expert parallelism only); remote: the
  // parameters other expert-parallel ranks hold.
  // pp: the pipeline group (its stages hold different parameters: the norm adds them).
  RunOptimizer(ParamSet& params, const AdamWConfig& cfg, Backend& backend, Communicator* dp,
               Communicator* tp, Communicator* edp = nullptr, Communicator* ep = nullptr,
               Communicator* pp = nullptr, std::vector<RemoteParam> remote = {})
      : params_(params), ep_(ep), pp_(pp), remote_(std::move(remote)) {
    if (dp)
      zero_ = std::make_unique<Zero1AdamW>(params, cfg, backend, *dp, tp);
    else
      adam_ = std::make_unique<AdamW>(params, cfg, backend);
    if (ep) experts_ = std::make_unique<Zero1AdamW>(params, cfg, backend, *edp, tp, 1);
  }
  // Reduces the gradients over the group (ZeRO-1) and returns the global norm.
  double reduce_and_norm() {
    if (!zero_) return adam_->grad_norm();
    auto sum = [](Communicator& c, double& x) {
      c.all_reduce(Tensor::contiguous_view(&x, DType::f64, Device::cpu, {1}, "grad_norm"),
                   ReduceOp::sum);
    };
    zero_->reduce_gradients();
    double sq = zero_->grad_norm_sq();
    if (experts_) {
      experts_->reduce_gradients();
      double e = experts_->grad_norm_sq();
      sum(*ep_, e);
      sq += e;
    }
    if (pp_) sum(*pp_, sq);
    return std::sqrt(sq);
  }
  void step(double lr, double norm) {
    if (!zero_) return adam_->step(lr, norm);
    zero_->step(lr, norm);
    if (experts_) experts_->step(lr, norm);
  }
  bool sharded() const { return zero_ != nullptr; }
  // The whole state of a single process.
  std::vector<CheckpointTensor> checkpoint_state() { return training_state(params_, *adam_); }
  // Under ZeRO-1, what this rank writes of a sharded checkpoint: its runs of the optimizer state,
  // the parameters when it is the first of its data-parallel group (dense_params) or of its
  // expert-data-parallel group (expert_params), and those every tp rank holds whole only when
  // with_replicated.
  std::vector<CheckpointPiece> shard_pieces(bool dense_params, bool expert_params,
                                            bool with_replicated) const {
    std::vector<CheckpointPiece> out = zero1_pieces(params_, *zero_, dense_params, with_replicated);
    if (experts_)
      for (CheckpointPiece& p : zero1_pieces(params_, *experts_, expert_params, with_replicated))
        out.push_back(std::move(p));
    return out;
  }
  // Under ZeRO-1 each rank reads only its runs of the masters and moments (and the parameters it
  // holds); the other pipeline stages' and expert-parallel ranks' tensors are named with empty
  // reads (the checkpoint's keys are checked whole).
  void load(const std::string& dir, int64_t steps) {
    if (!zero_) return load_checkpoint(dir, params_, *adam_);
    std::vector<float> master, m, v, e_master, e_m, e_v;
    std::vector<CheckpointRead> reads = zero1_reads(params_, *zero_, master, m, v);
    if (experts_) {
      for (CheckpointRead& r : zero1_reads(params_, *experts_, e_master, e_m, e_v))
        reads.push_back(std::move(r));
    }
    const DType t = params_.all().front().value.dtype;
    for (const RemoteParam& r : remote_)
      for (auto [kind, dtype] : {std::pair{"param", t},
                                 {"master", DType::f32},
                                 {"exp_avg", DType::f32},
                                 {"exp_avg_sq", DType::f32}})
        if (r.trainable || std::string(kind) == "param")
          reads.push_back({kind, r.name, dtype, r.shape, 0, 0, nullptr});
    load_checkpoint_ranges(dir, reads);
    zero_->load_shard(master, m, v, steps);
    if (experts_) experts_->load_shard(e_master, e_m, e_v, steps);
  }

 private:
  ParamSet& params_;
  Communicator *ep_, *pp_;
  std::vector<RemoteParam> remote_;
  std::unique_ptr<AdamW> adam_;
  std::unique_ptr<Zero1AdamW> zero_, experts_;
};

}  // namespace braid
