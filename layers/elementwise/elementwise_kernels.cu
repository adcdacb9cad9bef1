// Elementwise ops on the GPU: one thread per 4 consecutive elements, f32 math, memory-bound.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "layers/elementwise/elementwise.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kItems = 4;
using B = __nv_bfloat16;

unsigned blocks(int64_t n) {
  return unsigned((n + 256 * kItems - 1) / (256 * kItems));
}

// y = x (kAdd false) or y += x, converting through f32.
template <typename Y, typename X, bool kAdd>
__global__ void combine_kernel(Y* y, const X* x, int64_t n) {
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = i0 + k;
    if (i >= n) return;
    const float v = to_float(x[i]);
    y[i] = from_float<Y>(kAdd ? to_float(y[i]) + v : v);
  }
}

template <bool kAdd>
void combine(void* y, EwKind yt, const void* x, EwKind xt, int64_t n, void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned g = blocks(n);
  if (yt == EwKind::f32 && xt == EwKind::f32)
    combine_kernel<float, float, kAdd>
        <<<g, 256, 0, s>>>(static_cast<float*>(y), static_cast<const float*>(x), n);
  else if (yt == EwKind::f32)
    combine_kernel<float, B, kAdd>
        <<<g, 256, 0, s>>>(static_cast<float*>(y), static_cast<const B*>(x), n);
  else if (xt == EwKind::f32)
    combine_kernel<B, float, kAdd>
        <<<g, 256, 0, s>>>(static_cast<B*>(y), static_cast<const float*>(x), n);
  else
    combine_kernel<B, B, kAdd><<<g, 256, 0, s>>>(static_cast<B*>(y), static_cast<const B*>(x), n);
  CUDA_CHECK(cudaGetLastError());
}

__global__ void neg_exp_kernel(const float* a_log, float* a, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) a[i] = -expf(a_log[i]);
}

__global__ void neg_exp_bwd_kernel(const float* a, const float* da, float* da_log, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) da_log[i] += da[i] * a[i];
}

}  // namespace

void zero_fill_cuda(void* y, size_t bytes, void* stream) {
  if (bytes) CUDA_CHECK(cudaMemsetAsync(y, 0, bytes, static_cast<cudaStream_t>(stream)));
}

void add_into_cuda(void* y, EwKind yt, const void* x, EwKind xt, int64_t n, void* stream) {
  combine<true>(y, yt, x, xt, n, stream);
}

void cast_cuda(void* y, EwKind yt, const void* x, EwKind xt, int64_t n, void* stream) {
  combine<false>(y, yt, x, xt, n, stream);
}

void neg_exp_cuda(const float* a_log, float* a, int64_t n, void* stream) {
  if (n == 0) return;
  neg_exp_kernel<<<unsigned((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(a_log, a,
                                                                                           n);
  CUDA_CHECK(cudaGetLastError());
}

void neg_exp_backward_cuda(const float* a, const float* da, float* da_log, int64_t n,
                           void* stream) {
  if (n == 0) return;
  neg_exp_bwd_kernel<<<unsigned((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      a, da, da_log, n);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
