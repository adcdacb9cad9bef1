// The CUDA contract of the gated RMSNorm: sizes and pointers, validated on the host by
// gated_rmsnorm.cpp (and by layers/rmsnorm/rmsnorm.cpp: with z null it is the plain RMSNorm).
// x, z, y, dy, dx, dz are bf16 or f32 ([M,D] rows); w, dw, rstd and the workspace are f32.
#pragma once

#include <cstdint>

namespace braid {

struct GatedNormParams {
  int64_t rows = 0;
  int width = 0, groups = 1;
  float eps = 0.f;
  bool bf16 = true;
  const void *x = nullptr, *z = nullptr, *dy = nullptr;  // z null: no gate (dz unused)
  const float *w = nullptr, *rstd_in = nullptr;
  void *y = nullptr, *dx = nullptr, *dz = nullptr;
  float *rstd = nullptr, *dw = nullptr;
  float* partial = nullptr;  // [row blocks, D]: the backward's dw partial sums
  // Plain RMSNorm only: the forward normalises x + residual and stores that sum (rounded to the
  // activation dtype) in `sum`; the backward adds its dx into dx (accumulate_dx).
  const void* residual = nullptr;
  void* sum = nullptr;
  bool accumulate_dx = false;
};

// Launch on `stream` (a cudaStream_t; null for the default stream).
void gated_rmsnorm_fwd_cuda(const GatedNormParams& p, void* stream);
void gated_rmsnorm_bwd_cuda(const GatedNormParams& p, void* stream);

}  // namespace braid
