// Small elementwise ops used by blocks (contiguous tensors of one element count):
//   zero_fill:        y = 0
//   add_into:         y += x          (one dtype; or y f32 and x bf16: a low-precision gradient
//                                      added into an f32 one)
//   cast_into:        y = x           (f32 <-> bf16 on the GPU, rounded to nearest even; the same
//                                      dtype on either device)
//   neg_exp:          A = -exp(A_log) (SSM decay rates from their stored log)
//   neg_exp_backward: dA_log += dA * A  (dA/dA_log = -exp(A_log) = A)
// CPU tensors (f32, f64) run the loops below; GPU tensors the kernels of elementwise_kernels.cu
// (f32 math) on `stream` (null: the default stream). neg_exp is f32 on the GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

void zero_fill(const Tensor& y, void* stream = nullptr);
void add_into(const Tensor& y, const Tensor& x, void* stream = nullptr);
void cast_into(const Tensor& y, const Tensor& x, void* stream = nullptr);
void neg_exp(const Tensor& a_log, const Tensor& a, void* stream = nullptr);
void neg_exp_backward(const Tensor& a, const Tensor& da, const Tensor& da_log,
                      void* stream = nullptr);

// The CUDA side (sizes and dtypes checked by the caller), n elements each.
enum class EwKind : uint8_t { f32, bf16 };
void zero_fill_cuda(void* y, size_t bytes, void* stream);
void add_into_cuda(void* y, EwKind yt, const void* x, EwKind xt, int64_t n, void* stream);
void cast_cuda(void* y, EwKind yt, const void* x, EwKind xt, int64_t n, void* stream);
void neg_exp_cuda(const float* a_log, float* a, int64_t n, void* stream);
void neg_exp_backward_cuda(const float* a, const float* da, float* da_log, int64_t n, void* stream);

}  // namespace braid
