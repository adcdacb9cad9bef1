// MoE token dispatch on the GPU (moe_dispatch.h): the plan (offsets, row_token), row gathers and
// the weighted combine, forward and backward. Each output element is written by one thread and
// sums run over k in order (f32 accumulation): no atomics, the same bits every run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "layers/moe_dispatch/moe_dispatch.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kThreads = 128;

__global__ void offsets_kernel(const int32_t* counts, int e, int64_t cap, int32_t* off) {
  off[0] = 0;
  for (int j = 0; j < e; ++j) off[j + 1] = off[j] + int32_t(counts[j] < cap ? counts[j] : cap);
}

__global__ void row_token_kernel(const int32_t* ex, const int32_t* sl, const int32_t* off,
                                 int64_t n, int k, int32_t* tok) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n && sl[i] >= 0) tok[off[ex[i]] + sl[i]] = int32_t(i / k);
}

__device__ __forceinline__ int64_t row_of(const int32_t* ex, const int32_t* sl, const int32_t* off,
                                          int64_t i) {
  return sl[i] < 0 ? -1 : int64_t(off[ex[i]]) + sl[i];
}

template <typename T>
__global__ void gather_kernel(const T* x, const int32_t* tok, int64_t d, T* xe) {
  const int64_t r = blockIdx.x;
  const T* src = x + int64_t(tok[r]) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) xe[r * d + c] = src[c];
}

// dx[m] += sum_k dxe[row(m,k)] (gather backward), or y[m] = sum_k w[m,k] oe[row(m,k)] (combine).
template <typename T>
__global__ void token_sum_kernel(const T* rows, const int32_t* ex, const int32_t* sl,
                                 const int32_t* off, const float* w, int k, int64_t d,
                                 int accumulate, T* out) {
  const int64_t m = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = accumulate ? to_float(out[m * d + c]) : 0.f;
    for (int kk = 0; kk < k; ++kk) {
      const int64_t r = row_of(ex, sl, off, m * k + kk);
      if (r >= 0) acc += (w ? w[m * k + kk] : 1.f) * to_float(rows[r * d + c]);
    }
    out[m * d + c] = from_float<T>(acc);
  }
}

// doe[row(m,k)] = w[m,k] dy[m];  dweight[m,k] = dy[m] . oe[row(m,k)] (a fixed tree per block).
template <typename T>
__global__ void combine_backward_kernel(const T* dy, const T* oe, const int32_t* ex,
                                        const int32_t* sl, const int32_t* off, const float* w,
                                        int k, int64_t d, T* doe, float* dw) {
  __shared__ float red[kThreads];
  const int64_t m = blockIdx.x;
  for (int kk = 0; kk < k; ++kk) {
    const int64_t r = row_of(ex, sl, off, m * k + kk);
    float acc = 0.f;
    if (r >= 0)
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        const float g = to_float(dy[m * d + c]);
        doe[r * d + c] = from_float<T>(w[m * k + kk] * g);
        acc += g * to_float(oe[r * d + c]);
      }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) dw[m * k + kk] = red[0];
    __syncthreads();
  }
}

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

}  // namespace

void moe_dispatch_plan_cuda(const int32_t* expert, const int32_t* slot, const int32_t* counts,
                            int64_t m, int k, int e, int64_t cap, int32_t* offsets,
                            int32_t* row_token, void* stream) {
  offsets_kernel<<<1, 1, 0, as_stream(stream)>>>(counts, e, cap, offsets);
  const int64_t n = m * int64_t(k);
  if (n > 0)
    row_token_kernel<<<unsigned((n + 255) / 256), 256, 0, as_stream(stream)>>>(
        expert, slot, offsets, n, k, row_token);
  CUDA_CHECK(cudaGetLastError());
}

void moe_gather_cuda(const void* x, const int32_t* row_token, int64_t rows, int64_t d, bool bf16,
                     void* xe, void* stream) {
  if (rows == 0) return;
  for_row_dtype(bf16, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    gather_kernel<T><<<unsigned(rows), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), row_token, d, static_cast<T*>(xe));
  });
  CUDA_CHECK(cudaGetLastError());
}

void moe_token_sum_cuda(const void* rows, const int32_t* expert, const int32_t* slot,
                        const int32_t* offsets, const float* weight, int64_t m, int k, int64_t d,
                        bool accumulate, bool bf16, void* out, void* stream) {
  if (m == 0) return;
  for_row_dtype(bf16, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    token_sum_kernel<T><<<unsigned(m), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(rows), expert, slot, offsets, weight, k, d, accumulate ? 1 : 0,
        static_cast<T*>(out));
  });
  CUDA_CHECK(cudaGetLastError());
}

void moe_combine_backward_cuda(const void* dy, const void* oe, const int32_t* expert,
                               const int32_t* slot, const int32_t* offsets, const float* weight,
                               int64_t m, int k, int64_t d, bool bf16, void* doe, float* dweight,
                               void* stream) {
  if (m == 0) return;
  for_row_dtype(bf16, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    combine_backward_kernel<T><<<unsigned(m), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(oe), expert, slot, offsets, weight, k, d,
        static_cast<T*>(doe), dweight);
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
