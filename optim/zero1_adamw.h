// ZeRO-1 AdamW over a data-parallel group of P ranks. The parameters' flat gradient vector (n
// elements, n a multiple of P: ParamSet pads it) is reduce-scattered (summed), so rank r holds
// the gradient of elements [r n/P, (r+1) n/P); r keeps fp32 master weights and Adam moments for
// that shard only (1/P of the optimizer memory), updates it with the same rule as AdamW
// (decoupled decay for flagged parameters, bias correction, global-norm clipping), and the
// updated shards are all-gathered back into every rank's parameters. Elements of non-trainable
// parameters and alignment gaps are never updated.
// Under tensor parallelism (tp: the group of ranks holding the other shards of the same
// parameters), the global norm adds every rank's tensor-parallel shards and counts the
// parameters every tp rank holds whole (norms) once. An instance covers one region of the
// ParamSet: the replicated parameters over the data-parallel group, or (expert parallelism) the
// expert weights over the expert-data-parallel group; the trainer adds the regions' squared
// norms.
// On the GPU (parameters on a CUDA backend, the group an NCCL communicator), the f32 parameters
// are their own masters: the update writes this rank's shard of the flat values in place (one
// launch over a chunk table, adamw_kernels.cu) and the all-gather fills in the other shards; the
// moments live on the device, and the gradient shard is reduced in place in the gradient vector.
// Mirrors are not supported there; under tensor parallelism `tp` must then be an NCCL group too.
#pragma once

#include <cmath>

#include <vector>

#include "layers/model/params.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"
#include "runtime/arena.h"

namespace braid {

class Zero1AdamW {
 public:
  // Over the parameters of one region of `params` (0: replicated over the data-parallel group,
  // which is `dp`; 1: the expert weights, with `dp` the expert-data-parallel group).
  Zero1AdamW(ParamSet& params, const AdamWConfig& cfg, Backend& backend, Communicator& dp,
             Communicator* tp = nullptr, int region = 0);

  // Sums the gradients over the group into this rank's shard.
  void reduce_gradients();
  // Takes this rank's shard of gradients already summed over the group whole (GradBuckets).
  void use_reduced_gradients();
  // Global L2 norm of the reduced gradient (f64, fixed order within a rank, then summed), and its
  // square (to combine with another region's).
  double grad_norm() { return std::sqrt(grad_norm_sq()); }
  double grad_norm_sq();
  // Updates this rank's shard with learning rate lr and all-gathers the parameters.
  void step(double lr, double norm);

  // The full (unsharded) flat master weights and moments on every rank (collective).
  void gather_state(std::vector<float>& master, std::vector<float>& m, std::vector<float>& v);
  // Sets this rank's shards (elements [shard_begin, + shard_size) of the flat vectors, e.g. read
  // from a checkpoint) and the step count.
  void load_shard(const std::vector<float>& master, const std::vector<float>& m,
                  const std::vector<float>& v, int64_t steps_taken);

  int region() const { return region_; }
  int64_t shard_begin() const { return begin_; }
  int64_t shard_size() const { return shard_; }
  // This rank's fp32 master weights and Adam moments, elements [shard_begin, + shard_size) of the
  // flat parameter vector, on state_device() (the GPU's master is its shard of the values).
  const float* shard_master() const {
    return gpu_ ? params_.region_values(region_).ptr<float>() + begin_ : master_.data();
  }
  const float* shard_exp_avg() const { return gpu_ ? gpu_m_.ptr<float>() : m_.data(); }
  const float* shard_exp_avg_sq() const { return gpu_ ? gpu_v_.ptr<float>() : v_.data(); }
  Device state_device() const { return gpu_ ? Device::cuda : Device::cpu; }
  const std::vector<float>& shard_grad() const { return grad_; }  // CPU only
  int64_t steps_taken() const { return t_; }
  // Bytes of this rank's optimizer state (masters and moments of its shard; on the GPU the
  // moments, the gradient shard and the chunk table).
  size_t state_bytes() const {
    return gpu_ ? arena_.capacity() : sizeof(float) * (master_.size() + m_.size() + v_.size());
  }

 private:
  void init_gpu();
  enum Mask : uint8_t { frozen = 0, no_decay = 1, decay = 2 };  // per element of the shard
  ParamSet& params_;
  AdamWConfig cfg_;
  Communicator& dp_;
  Communicator* tp_;
  int region_ = 0;
  int64_t begin_ = 0, shard_ = 0, t_ = 0;
  std::vector<float> master_, m_, v_, grad_, send_;
  std::vector<uint8_t> mask_;
  // How an element counts in the norm: its tp shard (sharded), once though every tp rank holds
  // it (replicated), or not at all (a mirror: its original counts).
  enum Count : uint8_t { sharded = 0, replicated = 1, mirror = 2 };
  std::vector<uint8_t> count_;
  // GPU: the moments, the chunk table (AdamTask) and its norm partials, and the shard's
  // trainable runs (offset in the shard, count) that a loaded master fills.
  bool gpu_ = false;
  Backend& backend_;
  Arena arena_;
  Tensor gpu_m_, gpu_v_, tasks_, partials_, total_;
  int n_tasks_ = 0;
  std::vector<std::pair<int64_t, int64_t>> runs_;
};

}  // namespace braid
