// Gated, grouped RMSNorm of the Mamba-2 mixer (HF MambaRMSNormGated / NemotronH, with
// norm_before_gate = False): the gate is applied first, then each group of D/G channels is
// normalised on its own.
//   g = x * silu(z);   y = w * g * r_grp,   r_grp = 1 / sqrt(mean_{j in grp} g_j^2 + eps)
//   x [M,D], z [M,D], w [D], y [M,D], rstd [M,G] (saved).
//   dg  = r (w*dy) - g r^3 / (D/G) * sum_{grp} (w*dy) g        per group
//   dx  = dg * silu(z)                                          (=)
//   dz  = dg * x * silu'(z)                                     (=)
//   dw += sum_m dy * g * r                                      (+=)
#pragma once

#include "runtime/tensor.h"

namespace braid {

void gated_rmsnorm_forward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                           double eps, const Tensor& y, const Tensor& rstd);
void gated_rmsnorm_backward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                            const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                            const Tensor& dz, const Tensor& dw);

}  // namespace braid
