// SwiGLU on the GPU: elementwise, each thread 4 consecutive elements (vectorised when the
// pointers allow), f32 math; memory-bound (forward 3 bf16 per element, backward 5).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/swiglu/swiglu.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kItems = 4;

template <typename T>
__global__ void swiglu_fwd_kernel(const T* a, const T* b, T* y, int64_t n) {
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = i0 + k;
    if (i >= n) return;
    const float av = to_float(a[i]);
    y[i] = from_float<T>(av * sigmoid(av) * to_float(b[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* a, const T* b, const T* dy, T* da, T* db, int64_t n) {
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = i0 + k;
    if (i >= n) return;
    const float av = to_float(a[i]), g = to_float(dy[i]), s = sigmoid(av);
    da[i] = from_float<T>(g * to_float(b[i]) * s * (1.f + av * (1.f - s)));
    db[i] = from_float<T>(g * av * s);
  }
}

unsigned blocks(int64_t n) {
  return unsigned((n + 256 * kItems - 1) / (256 * kItems));
}

}  // namespace

void swiglu_forward_cuda(const void* a, const void* b, void* y, int64_t n, bool bf16,
                         void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  using B = __nv_bfloat16;
  if (bf16)
    swiglu_fwd_kernel<<<blocks(n), 256, 0, s>>>(static_cast<const B*>(a), static_cast<const B*>(b),
                                                static_cast<B*>(y), n);
  else
    swiglu_fwd_kernel<<<blocks(n), 256, 0, s>>>(
        static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(y), n);
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward_cuda(const void* a, const void* b, const void* dy, void* da, void* db,
                          int64_t n, bool bf16, void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  using B = __nv_bfloat16;
  if (bf16)
    swiglu_bwd_kernel<<<blocks(n), 256, 0, s>>>(static_cast<const B*>(a), static_cast<const B*>(b),
                                                static_cast<const B*>(dy), static_cast<B*>(da),
                                                static_cast<B*>(db), n);
  else
    swiglu_bwd_kernel<<<blocks(n), 256, 0, s>>>(
        static_cast<const float*>(a), static_cast<const float*>(b), static_cast<const float*>(dy),
        static_cast<float*>(da), static_cast<float*>(db), n);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
