// A block owns weights and composes ops: the f in a pre-norm residual sub-layer x += f(norm(x)).
// Set-up: the constructor registers parameters; plan() takes from `saved` what forward keeps for
// backward and from `scratch` what it needs only while it runs (scratch is shared by all blocks,
// which run one at a time). No memory is taken after planning.
// Precision: activations take the dtype of the parameters' compute copies (Param::compute: bf16
// under mixed precision), and what the kernels keep in f32 (RMS scales, log-sum-exps, dt, decay
// rates, workspaces) takes the parameters' own dtype (Param::value: f32, or f64 in gradient
// checks).
// Gradient convention: backward writes dx (=) and accumulates parameter gradients (+=).
#pragma once

#include <cstdint>
#include <string>

#include "layers/model/params.h"
#include "parallel/communicator.h"
#include "runtime/arena.h"

namespace braid {

class GemmContext;

// Per-microbatch metadata of a packed batch, and what the ops need to run on the device.
struct BatchMeta {
  const Tensor* seq_idx = nullptr;    // [B,T] i32 document index within each row
  const Tensor* positions = nullptr;  // [B,T] i32 position within the document
  double aux_loss_scale = 1.0;        // d(total loss)/d(this microbatch's auxiliary losses)
  // Context parallelism: the [B,T] tokens are rank r's shard of every sequence of this group
  // (consecutive shards on consecutive ranks); the SSM mixers pass states between the ranks.
  Communicator* cp = nullptr;
  // false: a forward that is not part of the step's gradient (held-out evaluation, a pipeline
  // stage's forward before it recomputes it for the backward): MoE routing is not counted.
  bool count_routing = true;
  // GPU tensors: the cuBLASLt handle, workspace and stream the linear layers use.
  const GemmContext* gemm = nullptr;
};

class Block {
 public:
  virtual ~Block() = default;
  virtual void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) = 0;
  // State kept across forwards and steps (MoE routing counts), taken before `plan`, from an arena
  // that activation recompute never shares between blocks.
  virtual void plan_state(Arena& state) { (void)state; }
  // x, y [B,T,D]
  virtual void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) = 0;
  // x is the forward input; dy, dx [B,T,D]
  virtual void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                        const BatchMeta& meta) = 0;
  // Weighted auxiliary losses added by the last forward (MoE router), else 0.
  virtual double aux_loss() const { return 0.0; }
  // Whether the backward reads host-side state the forward left (not in the saved tensors), so
  // that the block's forward must run again before its backward when other forwards came between
  // (the model's activation slots).
  virtual bool forward_state_on_host() const { return false; }
  // Model FLOPs of forward + backward per token (matmuls and the sequence mixer).
  virtual double flops_per_token(int64_t seq) const = 0;
};

// The tensor-parallel group a block is split over (no group: size 1), as Megatron-LM's column /
// row parallel pairs: a column-parallel weight holds a slice of the output features (rows), the
// row-parallel weight after it the matching slice of its input features (columns); the partial
// outputs of the row-parallel one are summed over the group in forward, and the partial input
// gradients of the column-parallel one in backward. Activations outside the pair are replicated,
// or, with sequence_parallel, split by rows over the group: the model then all-gathers a block's
// input and reduce-scatters its output (and the reverse in backward), and the block leaves its
// output and input gradient as partial sums (reduce_output does nothing).
struct TensorParallel {
  Communicator* group = nullptr;
  bool sequence_parallel = false;
  bool partial_outputs = false;  // reduce_output leaves outputs partial: the caller sums them
  int size() const { return group ? group->size() : 1; }
  int rank() const { return group ? group->rank() : 0; }
  // This rank's slice of a weight split along dimension dim (whole when size 1).
  ParamShard shard(int dim) const {
    return size() > 1 ? ParamShard{dim, size(), rank()} : ParamShard{};
  }
  bool split_rows() const { return sequence_parallel && size() > 1; }
  // t = sum over the group of t (in place).
  void sum(const Tensor& t) const {
    if (size() > 1) group->all_reduce(t, ReduceOp::sum);
  }
  // A block's output (forward) or input gradient (backward): summed here, or left partial for
  // the model's reduce-scatter under sequence parallelism (or for a caller that sums it).
  void reduce_output(const Tensor& t) const {
    if (!split_rows() && !partial_outputs) sum(t);
  }
};

// Parameter name helper: prefix + "." + leaf.
inline std::string pname(const std::string& prefix, const std::string& leaf) {
  return prefix + "." + leaf;
}

}  // namespace braid
