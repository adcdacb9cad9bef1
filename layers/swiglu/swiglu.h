// SwiGLU activation (HF LlamaMLP's act_fn(gate) * up with act_fn = SiLU):
//   y = silu(a) * b;   a, b, y [M,F].
//   da = dy * b * silu'(a)   (=)      db = dy * silu(a)   (=)
// CPU tensors (f32, f64) run the reference, GPU tensors (bf16 or f32, one dtype) the CUDA
// kernels (swiglu_kernels.cu) on `stream` (null: the default stream).
#pragma once

#include "runtime/tensor.h"

namespace braid {

void swiglu_forward(const Tensor& a, const Tensor& b, const Tensor& y, void* stream = nullptr);
void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dy, const Tensor& da,
                     const Tensor& db, void* stream = nullptr);

// The CUDA side: sizes checked by the caller; bf16 or f32 elements, n of each.
void swiglu_forward_cuda(const void* a, const void* b, void* y, int64_t n, bool bf16, void* stream);
void swiglu_backward_cuda(const void* a, const void* b, const void* dy, void* da, void* db,
                          int64_t n, bool bf16, void* stream);

}  // namespace braid
