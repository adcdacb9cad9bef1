// Helpers shared by the CPU references: dtype dispatch (f32 for training, f64 for gradient
// checks), argument validation, and the scalar activation functions with their derivatives.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "runtime/parallel_for.h"
#include "runtime/tensor.h"

namespace braid {

// Calls body<T>() with T = float or double according to `dtype`; other dtypes are errors that
// name the op. Usage: dispatch_float(x.dtype, "linear", [&]<typename T>() { ... });
template <typename F>
void dispatch_float(DType dtype, const char* op, F&& body) {
  switch (dtype) {
    case DType::f32:
      body.template operator()<float>();
      return;
    case DType::f64:
      body.template operator()<double>();
      return;
    default:
      BRAID_FAIL(op, ": the CPU reference supports f32 and f64 tensors, got ", dtype_name(dtype));
  }
}

// Every tensor handed to a CPU reference must be a contiguous host tensor.
// GPU kernels' arguments: every given tensor (null ones skipped) is a contiguous CUDA tensor, or
// has the dtype `want`.
inline void require_gpu(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t)
      BRAID_CHECK(t->device == Device::cuda && t->is_contiguous(), op, " (CUDA): ", t->describe(),
                  " must be a contiguous GPU tensor");
}
inline void require_dtype(const char* op, DType want, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t)
      BRAID_CHECK(t->dtype == want, op, " (CUDA): ", t->describe(), " must be ", dtype_name(want));
}

inline void require_host(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (!t || !t->data) continue;
    BRAID_CHECK(t->device == Device::cpu, op, ": ", t->describe(),
                " is on the GPU and this op has no CUDA kernel yet");
    BRAID_CHECK(t->is_contiguous(), op, ": ", t->describe(), " must be contiguous");
  }
}

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
template <typename T>
T silu(T x) {
  return x * sigmoid(x);
}
// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)
template <typename T>
T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}
// softplus(x) = log(1 + e^x), with the linear branch above 20 (as PyTorch's threshold).
template <typename T>
T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

// dst[index[r], :] += src[r, :] for r in [0, rows), rows of width d. Split over column blocks;
// each block adds the rows in order, so the result does not depend on the thread count (the
// backward of every row gather: embedding lookup, MoE token permutation).
// Rows whose index is negative are skipped.
template <typename T>
void scatter_add_rows(const T* src, const int32_t* index, int64_t rows, int64_t d, T* dst) {
  constexpr int64_t kCols = 64;
  parallel_for((d + kCols - 1) / kCols, [&](int64_t blk) {
    const int64_t c0 = blk * kCols, c1 = std::min(d, c0 + kCols);
    for (int64_t r = 0; r < rows; ++r)
      if (index[r] >= 0)
        for (int64_t c = c0; c < c1; ++c) dst[index[r] * d + c] += src[r * d + c];
  });
}

}  // namespace braid
