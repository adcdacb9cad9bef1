// The CUDA contract of the selective scan: one Params struct (pointers, element strides, sizes),
// built and validated on the host by selective_scan.cpp. Activations (u, delta, z, B, C, y) are
// f32 or bf16 with channels contiguous ([B,T,C] and [B,T,G,N] rows); A, D, delta_bias and the
// states are f32; seq_idx is i32.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

struct ScanParams {
  int batch = 0, seqlen = 0, channels = 0, d_state = 0, groups = 1;
  bool bf16 = false;  // activation dtype: bf16 (else f32)
  bool delta_softplus = true;
  const void *u = nullptr, *delta = nullptr, *z = nullptr, *B = nullptr, *C = nullptr;
  void* y = nullptr;
  int64_t u_batch_stride = 0, u_time_stride = 0;    // also for delta, z, y (same layout)
  int64_t bc_batch_stride = 0, bc_time_stride = 0;  // B and C [B,T,G,N]
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr;
  const int32_t* seq_idx = nullptr;      // [B,T]
  const float* initial_state = nullptr;  // [B,C,N]
  float* final_state = nullptr;          // [B,C,N]
};

// Launches the forward kernel on `stream` (a cudaStream_t; null for the default stream).
void selective_scan_fwd_cuda(const ScanParams& p, void* stream);

struct ScanInputs;
// Validates GPU tensors, builds the Params and launches (selective_scan.cpp).
void selective_scan_forward_gpu(const ScanInputs& in, const Tensor& y, const Tensor* final_state);

}  // namespace braid
