// Linear (HF nn.Linear): y = x W^T + b.
//   x [M, I], W [O, I], b [O] (optional), y [M, O].
// Gradient convention (all ops): activation gradients overwrite, parameter gradients accumulate.
//   dx  = dy W          (=)      [M, I]
//   dW += dy^T x        (+=)     [O, I]
//   db += sum_m dy      (+=)     [O]
// The CPU reference splits work over rows with a fixed order of summation, so results do not
// depend on the thread count. GPU tensors (x, W, dy, dx bf16 or f32, one dtype; y and dW that
// dtype or f32, as mixed precision keeps f32 gradients; b, db x's dtype) run cuBLASLt GEMMs with
// f32 accumulation and need a GemmContext (linear_cuda.h).
#pragma once

#include "runtime/tensor.h"

namespace braid {

class GemmContext;

void linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                    const GemmContext* gemm = nullptr);
// dx may be null (skipped) when the input needs no gradient. accumulate_dx: dx += dy W instead
// (the sum of several projections' input gradients without a temporary; the GPU's GEMM adds it).
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor* dx,
                     const Tensor& dw, const Tensor* dbias, const GemmContext* gemm = nullptr,
                     bool accumulate_dx = false);

// The GPU side (linear_cuda.cpp), after the shape checks.
void linear_forward_gpu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                        const GemmContext* gemm);
void linear_backward_gpu(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor* dx,
                         const Tensor& dw, const Tensor* dbias, const GemmContext* gemm,
                         bool accumulate_dx);

namespace ref {
// Row-major matrix products on raw pointers, used by several references:
//   nt: C[m,n] (=|+=) sum_k A[m,k] B[n,k]     nn: C[m,n] = sum_k A[m,k] B[k,n]
//   tn: C[m,n] += sum_k A[k,m] B[k,n]     (nn with accumulate: C[m,n] += ...)
template <typename T>
void matmul_nt(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k, bool accumulate);
template <typename T>
void matmul_nn(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k,
               bool accumulate = false);
template <typename T>
void matmul_tn_acc(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t k);
}  // namespace ref

}  // namespace braid
