// AdamW (decoupled weight decay, PyTorch torch.optim.AdamW) with fp32 master weights and moments:
//   p <- p - lr * wd * p   (only parameters flagged for decay: not norms, biases, A_log, D, dt
//   bias) m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2 p <- p - lr * (m / (1 - b1^t)) /
//   (sqrt(v / (1 - b2^t)) + eps)
// then the model's parameter tensor (and its bf16 compute copy, if it has one) is written from the
// master; an f32 parameter is its own master. The CPU path trains f32 parameters; on the GPU
// (parameters on a CUDA backend) f32 or bf16 parameters and gradients (the parameter rounded from
// the master), every parameter in one launch (adamw_kernels.cu).
// Gradients are first multiplied by clip_coef = min(1, max_norm / (||g|| + 1e-6)) where ||g|| is
// the global L2 norm over all trainable parameters, summed in f64 in a fixed order.
#pragma once

#include <vector>

#include "layers/model/params.h"
#include "runtime/arena.h"

namespace braid {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // <= 0: no clipping
};

class AdamW {
 public:
  AdamW(ParamSet& params, const AdamWConfig& cfg, Backend& backend);

  // Global L2 norm of the current gradients.
  double grad_norm() const;
  // One update with learning rate lr and the clipping coefficient implied by `norm`.
  void step(double lr, double norm);
  int64_t steps_taken() const { return t_; }
  // Bytes of optimizer memory: the moments, the masters of non-f32 parameters, the chunk table.
  size_t state_bytes() const { return arena_.capacity(); }

  struct State {
    const Param* param;
    Tensor master, m, v;  // fp32, same shape as the parameter (master: the parameter itself if f32)
  };
  const std::vector<State>& state() const { return state_; }
  // For loading a checkpoint: the number of steps already taken (sets the bias correction).
  void set_steps_taken(int64_t t) { t_ = t; }

 private:
  ParamSet& params_;
  AdamWConfig cfg_;
  Backend& backend_;
  Arena arena_;
  std::vector<State> state_;
  mutable std::vector<double> partials_;  // per-block sums of grad_norm, sized once
  int64_t t_ = 0;
  // GPU: the chunk table (AdamTask, in arena_), its per-chunk norm partials and their sum.
  bool gpu_ = false;
  int n_tasks_ = 0;
  Tensor tasks_, gpu_partials_, gpu_total_;
};

}  // namespace braid
