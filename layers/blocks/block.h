// A block owns weights and composes ops: the f in a pre-norm residual sub-layer x += f(norm(x)).
// Set-up: the constructor registers parameters; plan() takes from `saved` what forward keeps for
// backward and from `scratch` what it needs only while it runs (scratch is shared by all blocks,
// which run one at a time). No memory is taken after planning.
// Gradient convention: backward writes dx (=) and accumulates parameter gradients (+=).
#pragma once

#include <cstdint>
#include <string>

#include "layers/model/params.h"
#include "runtime/arena.h"

namespace braid {

// Per-microbatch metadata of a packed batch.
struct BatchMeta {
  const Tensor* seq_idx = nullptr;    // [B,T] i32 document index within each row
  const Tensor* positions = nullptr;  // [B,T] i32 position within the document
  double aux_loss_scale = 1.0;        // d(total loss)/d(this microbatch's auxiliary losses)
};

class Block {
 public:
  virtual ~Block() = default;
  virtual void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) = 0;
  // x, y [B,T,D]
  virtual void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) = 0;
  // x is the forward input; dy, dx [B,T,D]
  virtual void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                        const BatchMeta& meta) = 0;
  // Weighted auxiliary losses added by the last forward (MoE router), else 0.
  virtual double aux_loss() const { return 0.0; }
  // Model FLOPs of forward + backward per token (matmuls and the sequence mixer).
  virtual double flops_per_token(int64_t seq) const = 0;
};

// Parameter name helper: prefix + "." + leaf.
inline std::string pname(const std::string& prefix, const std::string& leaf) {
  return prefix + "." + leaf;
}

}  // namespace braid
