// The optimizer of a training run over any layout, and its checkpoint state.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/device_staging.h"
#include "layers/model/params.h"
#include "optim/adamw.h"
#include "optim/zero1_adamw.h"
#include "parallel/communicator.h"

namespace braid {

// The optimizer of a run: AdamW on one process, ZeRO-1 AdamW over the data-parallel group.
// Under expert parallelism the expert weights (parameter region 1) get their own ZeRO-1 over the
// expert-data-parallel group, and the global gradient norm adds both regions (the experts' summed
// over the expert-parallel ranks, which hold different experts). A rank may hold several model
// chunks (interleaved pipeline stages), each with its own parameter set: each gets its own
// ZeRO-1, and the norm adds them. Checkpoints hold the state in logical (unsharded) coordinates
// either way: a process writes it whole, ZeRO-1 ranks each write their runs of it; either layout
// resumes from either.
class RunOptimizer {
 public:
  // Several ranks (dp and tp groups given) always run ZeRO-1, even over a dp group of one: its
  // checkpoints are the sharded ones, which tensor-parallel shards need. edp and ep: the
  // expert-data-parallel and expert-parallel groups (expert parallelism only); pp: the pipeline
  // group (its stages hold different parameters: the norm adds them); remote: the parameters the
  // other ranks hold (other stages, other experts).
  RunOptimizer(std::vector<ParamSet*> sets, const AdamWConfig& cfg, Backend& backend,
               Communicator* dp, Communicator* tp, Communicator* edp = nullptr,
               Communicator* ep = nullptr, Communicator* pp = nullptr,
               std::vector<RemoteParam> remote = {})
      : sets_(std::move(sets)), backend_(backend), ep_(ep), pp_(pp), remote_(std::move(remote)) {
    BRAID_CHECK(!sets_.empty() && (dp || sets_.size() == 1),
                "RunOptimizer: one parameter set per model chunk (one without a group)");
    if (!dp) {
      adam_ = std::make_unique<AdamW>(*sets_[0], cfg, backend);
      return;
    }
    for (ParamSet* ps : sets_) {
      zeros_.push_back(std::make_unique<Zero1AdamW>(*ps, cfg, backend, *dp, tp));
      if (ep) experts_.push_back(std::make_unique<Zero1AdamW>(*ps, cfg, backend, *edp, tp, 1));
    }
  }
  // Reduces the gradients over the group (ZeRO-1) and returns the global norm. dense_reduced: the
  // replicated parameters' gradients (region 0) are already summed over the group whole
  // (GradBuckets), and each rank takes its shard.
  double reduce_and_norm(bool dense_reduced = false) {
    if (adam_) return adam_->grad_norm();
    auto sum = [](Communicator& c, double& x) {
      c.all_reduce(Tensor::contiguous_view(&x, DType::f64, Device::cpu, {1}, "grad_norm"),
                   ReduceOp::sum);
    };
    double sq = 0, e = 0;
    for (auto& z : zeros_) {
      if (dense_reduced)
        z->use_reduced_gradients();
      else
        z->reduce_gradients();
      sq += z->grad_norm_sq();
    }
    for (auto& z : experts_) z->reduce_gradients(), e += z->grad_norm_sq();
    if (ep_) sum(*ep_, e);
    sq += e;
    if (pp_) sum(*pp_, sq);
    return std::sqrt(sq);
  }
  // Updates the parameters and their compute copies under mixed precision (the GPU AdamW writes
  // them in its update).
  void step(double lr, double norm) {
    if (staging_gpu_) staging_gpu_->fence();  // a checkpoint's copies read this step's inputs
    if (adam_) return adam_->step(lr, norm);
    for (auto& z : zeros_) z->step(lr, norm);
    for (auto& z : experts_) z->step(lr, norm);
    for (ParamSet* ps : sets_) ps->refresh_compute();
  }
  bool sharded() const { return adam_ == nullptr; }
  size_t state_bytes() const {
    size_t n = adam_ ? adam_->state_bytes() : 0;
    for (const auto* set : {&zeros_, &experts_})
      for (const auto& z : *set) n += z->state_bytes();
    return n;
  }
  // The whole state of a single process, in host memory. A GPU run's is staged: copied into
  // page-locked host mirrors kept for the run (DeviceStaging), asynchronously; call wait_staged()
  // before reading it, and stage again only after its writer is done.
  std::vector<CheckpointTensor> checkpoint_state() {
    std::vector<CheckpointTensor> state = training_state(*sets_[0], *adam_);
    if (backend_.device() == Device::cpu) return state;
    staging().stage(state);
    return state;
  }
  // Under ZeRO-1, what this rank writes of a sharded checkpoint: its runs of the optimizer state,
  // the parameters when it is the first of its data-parallel group (dense_params) or of its
  // expert-data-parallel group (expert_params), and those every tp rank holds whole only when
  // with_replicated. On the GPU they are staged as checkpoint_state's are.
  std::vector<CheckpointPiece> shard_pieces(bool dense_params, bool expert_params,
                                            bool with_replicated) {
    std::vector<CheckpointPiece> out = host_pieces(dense_params, expert_params, with_replicated);
    if (backend_.device() == Device::cuda) staging().stage(out);
    return out;
  }
  // A GPU run's host mirrors, made before the first save so that it does not wait for them.
  void prepare_checkpoints() {
    if (backend_.device() == Device::cuda) staging();
  }
  // Blocks until a GPU run's staged state is in host memory (a writer's first act).
  void wait_staged() {
    if (staging_gpu_) staging_gpu_->wait_copied();
  }
  // Under ZeRO-1 each rank reads only its runs of the masters and moments (and the parameters it
  // holds); the other ranks' tensors are named with empty reads (the checkpoint's keys are
  // checked whole).
  void load(const std::string& dir, int64_t steps) {
    if (adam_ && backend_.device() == Device::cpu) return load_checkpoint(dir, *sets_[0], *adam_);
    if (adam_) {  // read into the host mirror, then copied to the GPU
      std::vector<CheckpointTensor> state = training_state(*sets_[0], *adam_);
      staging().unstage(state);
      load_checkpoint(dir, state);
      staging().upload();
      adam_->set_steps_taken(steps);
      sets_[0]->refresh_compute();
      return;
    }
    struct Shard {
      Zero1AdamW* opt;
      std::vector<float> master, m, v;
    };
    std::vector<Shard> shards;
    std::vector<CheckpointRead> reads;
    for (size_t i = 0; i < sets_.size(); ++i)
      for (Zero1AdamW* z : {zeros_[i].get(), experts_.empty() ? nullptr : experts_[i].get()})
        if (z) shards.push_back({z, {}, {}, {}});
    for (size_t i = 0, k = 0; i < sets_.size(); ++i)
      for (int n = experts_.empty() ? 1 : 2; n > 0; --n, ++k)
        for (CheckpointRead& r :
             zero1_reads(*sets_[i], *shards[k].opt, shards[k].master, shards[k].m, shards[k].v))
          reads.push_back(std::move(r));
    const DType t = sets_[0]->all().front().value.dtype;
    for (const RemoteParam& r : remote_)
      for (auto [kind, dtype] : {std::pair{"param", t},
                                 {"master", DType::f32},
                                 {"exp_avg", DType::f32},
                                 {"exp_avg_sq", DType::f32}})
        if (r.trainable || std::string(kind) == "param")
          reads.push_back({kind, r.name, dtype, r.shape, 0, 0, nullptr});
    const bool gpu = backend_.device() == Device::cuda;
    if (gpu) staging().unstage(reads);  // the parameters: through the host mirror
    load_checkpoint_ranges(dir, reads);
    if (gpu) staging().upload();
    for (Shard& sh : shards) sh.opt->load_shard(sh.master, sh.m, sh.v, steps);
    for (ParamSet* ps : sets_) ps->refresh_compute();
  }

 private:
  std::vector<CheckpointPiece> host_pieces(bool dense_params, bool expert_params,
                                           bool with_replicated) const {
    std::vector<CheckpointPiece> out;
    for (size_t i = 0; i < sets_.size(); ++i) {
      for (CheckpointPiece& p : zero1_pieces(*sets_[i], *zeros_[i], dense_params, with_replicated))
        out.push_back(std::move(p));
      if (!experts_.empty())
        for (CheckpointPiece& p :
             zero1_pieces(*sets_[i], *experts_[i], expert_params, with_replicated))
          out.push_back(std::move(p));
    }
    return out;
  }

  std::vector<ParamSet*> sets_;
  Backend& backend_;
  // The device regions a GPU run's checkpoints read (parameter values, optimizer state), with
  // their host mirrors; made at set-up (prepare_checkpoints) or the first load.
  DeviceStaging& staging() {
    if (!staging_gpu_) {
      std::vector<DeviceStaging::Region> regions;
      auto add = [&](const void* p, size_t bytes) {
        for (const auto& r : regions)
          if (r.data == p) return;  // an f32 parameter is its own master
        regions.push_back({p, bytes});
      };
      if (adam_) {
        for (const CheckpointTensor& c : training_state(*sets_[0], *adam_))
          add(c.tensor.data, c.tensor.nbytes());
      } else {
        for (size_t i = 0; i < sets_.size(); ++i) {
          const Tensor values = sets_[i]->flat_values();
          add(values.data, values.nbytes());
          for (const auto* z : {zeros_[i].get(), experts_.empty() ? nullptr : experts_[i].get()})
            if (z)
              for (const float* p : {z->shard_exp_avg(), z->shard_exp_avg_sq()})
                add(p, size_t(z->shard_size()) * sizeof(float));
        }
      }
      staging_gpu_ = std::make_unique<DeviceStaging>(backend_, std::move(regions));
    }
    return *staging_gpu_;
  }

  std::unique_ptr<DeviceStaging> staging_gpu_;
  Communicator *ep_, *pp_;
  std::vector<RemoteParam> remote_;
  std::unique_ptr<AdamW> adam_;
  std::vector<std::unique_ptr<Zero1AdamW>> zeros_, experts_;
};

}  // namespace braid
