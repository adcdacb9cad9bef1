// Gated, grouped RMSNorm of the Mamba-2 mixer (HF MambaRMSNormGated / NemotronH, with
// norm_before_gate = False): the gate is applied first, then each group of D/G channels is
// normalised on its own.
//   g = x * silu(z);   y = w * g * r_grp,   r_grp = 1 / sqrt(mean_{j in grp} g_j^2 + eps)
//   x [M,D], z [M,D], w [D], y [M,D], rstd [M,G] (saved).
//   dg  = r (w*dy) - g r^3 / (D/G) * sum_{grp} (w*dy) g        per group
//   dx  = dg * silu(z)                                          (=)
//   dz  = dg * x * silu'(z)                                     (=)
//   dw += sum_m dy * g * r                                      (+=)
// CPU tensors (f32, f64) run the reference, every tensor of one dtype. GPU tensors run the CUDA
// kernels: x, z, y, dy, dx, dz in bf16 or f32, w, dw and rstd in f32; the backward sums dw over
// row blocks into a workspace of gated_rmsnorm_workspace_elems f32 elements, then over the
// blocks in order (deterministic). `stream` is the CUDA stream (null: the default stream).
#pragma once

#include "runtime/tensor.h"

namespace braid {

void gated_rmsnorm_forward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                           double eps, const Tensor& y, const Tensor& rstd, void* stream = nullptr);
// Elements of the backward's workspace: 0 on the CPU.
int64_t gated_rmsnorm_workspace_elems(const Tensor& x);
void gated_rmsnorm_backward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                            const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                            const Tensor& dz, const Tensor& dw, const Tensor* workspace = nullptr,
                            void* stream = nullptr);

// Shapes only (both devices).
void gated_rmsnorm_check_shapes(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                                const Tensor& y, const Tensor& rstd);
// The GPU backward's row blocks: dw is summed over 256 rows per block first.
inline int64_t gated_rmsnorm_row_blocks(int64_t rows) {
  return (rows + 255) / 256;
}

// The CUDA side (gated_rmsnorm.cpp, gated_rmsnorm_kernels.cu). gated = false ignores z (and dz):
// the plain RMSNorm (layers/rmsnorm/).
void gated_rmsnorm_forward_gpu(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                               double eps, const Tensor& y, const Tensor& rstd, void* stream,
                               bool gated = true, const Tensor* residual = nullptr,
                               const Tensor* sum = nullptr);
void gated_rmsnorm_backward_gpu(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                                const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                                const Tensor& dz, const Tensor& dw, const Tensor* workspace,
                                void* stream, bool gated = true, bool accumulate_dx = false);

}  // namespace braid
