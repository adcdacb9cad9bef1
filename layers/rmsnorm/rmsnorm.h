// RMSNorm (HF LlamaRMSNorm / MambaRMSNorm): y = x * r * w,  r = 1 / sqrt(mean_j x_j^2 + eps).
//   x [M,D], w [D], y [M,D], rstd [M] (saved r, written by forward).
//   dx  = r (w*dy) - x r^3 / D * sum_j (w*dy)_j x_j      (=)
//   dw += sum_m dy * x * r                                (+=, rows in order)
// CPU tensors (f32, f64) run the reference. GPU tensors (x, y, dy, dx bf16 or f32; w, dw, rstd
// f32) run the gated RMSNorm's kernels without a gate (layers/gated_rmsnorm/): the backward sums
// dw over row blocks into a workspace of rmsnorm_workspace_elems f32 elements first.
// The residual stream's add fused with the norm of its result (one pass on the GPU):
//   s = a + b (rounded to the dtype, as a separate add would),  y = rmsnorm(s)
// and the backward can add its dx into dx (accumulate_dx: dx += ...) instead of writing it.
#pragma once

#include "runtime/tensor.h"

namespace braid {

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                     const Tensor& rstd, void* stream = nullptr);
// Elements of the backward's workspace: 0 on the CPU.
int64_t rmsnorm_workspace_elems(const Tensor& x);
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, const Tensor* workspace = nullptr,
                      void* stream = nullptr, bool accumulate_dx = false);
// a, b, s, y [M,D]; s may not alias a or b.
void add_rmsnorm_forward(const Tensor& a, const Tensor& b, const Tensor& w, double eps,
                         const Tensor& s, const Tensor& y, const Tensor& rstd,
                         void* stream = nullptr);

}  // namespace braid
