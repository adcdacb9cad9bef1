// SwiGLU on the GPU: elementwise, f32 math; memory-bound (forward 3 bf16 per element, backward
// 5). Each thread takes 8 consecutive elements: 16-byte vectors when every pointer is 16-byte
// aligned (then only the last thread's tail goes element by element), else elements one by one.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/swiglu/swiglu.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kItems = 8;

template <typename T>
__global__ void swiglu_fwd_kernel(const T* a, const T* b, T* y, int64_t n, bool vec) {
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
  if (vec && i0 + kItems <= n) {
    float av[8], bv[8];
    load8(a + i0, av);
    load8(b + i0, bv);
#pragma unroll
    for (int k = 0; k < 8; ++k) av[k] = av[k] * sigmoid(av[k]) * bv[k];
    store8(y + i0, av);
    return;
  }
  for (int64_t i = i0; i < i0 + kItems && i < n; ++i) {
    const float av = to_float(a[i]);
    y[i] = from_float<T>(av * sigmoid(av) * to_float(b[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* a, const T* b, const T* dy, T* da, T* db, int64_t n,
                                  bool vec) {
  const int64_t i0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kItems;
  if (vec && i0 + kItems <= n) {
    float av[8], bv[8], g[8], dav[8], dbv[8];
    load8(a + i0, av);
    load8(b + i0, bv);
    load8(dy + i0, g);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float s = sigmoid(av[k]);
      dav[k] = g[k] * bv[k] * s * (1.f + av[k] * (1.f - s));
      dbv[k] = g[k] * av[k] * s;
    }
    store8(da + i0, dav);
    store8(db + i0, dbv);
    return;
  }
  for (int64_t i = i0; i < i0 + kItems && i < n; ++i) {
    const float av = to_float(a[i]), g = to_float(dy[i]), s = sigmoid(av);
    da[i] = from_float<T>(g * to_float(b[i]) * s * (1.f + av * (1.f - s)));
    db[i] = from_float<T>(g * av * s);
  }
}

bool aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
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
                                                static_cast<B*>(y), n, aligned({a, b, y}));
  else
    swiglu_fwd_kernel<<<blocks(n), 256, 0, s>>>(static_cast<const float*>(a),
                                                static_cast<const float*>(b),
                                                static_cast<float*>(y), n, aligned({a, b, y}));
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward_cuda(const void* a, const void* b, const void* dy, void* da, void* db,
                          int64_t n, bool bf16, void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  using B = __nv_bfloat16;
  if (bf16)
    swiglu_bwd_kernel<<<blocks(n), 256, 0, s>>>(
        static_cast<const B*>(a), static_cast<const B*>(b), static_cast<const B*>(dy),
        static_cast<B*>(da), static_cast<B*>(db), n, aligned({a, b, dy, da, db}));
  else
    swiglu_bwd_kernel<<<blocks(n), 256, 0, s>>>(
        static_cast<const float*>(a), static_cast<const float*>(b), static_cast<const float*>(dy),
        static_cast<float*>(da), static_cast<float*>(db), n, aligned({a, b, dy, da, db}));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
