// RMSNorm (HF LlamaRMSNorm / MambaRMSNorm): y = x * r * w,  r = 1 / sqrt(mean_j x_j^2 + eps).
//   x [M,D], w [D], y [M,D], rstd [M] (saved r, written by forward).
//   dx  = r (w*dy) - x r^3 / D * sum_j (w*dy)_j x_j      (=)
//   dw += sum_m dy * x * r                                (+=, rows in order)
#pragma once

#include "runtime/tensor.h"

namespace braid {

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                     const Tensor& rstd);
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw);

}  // namespace braid
