// RoPE on the GPU: one block per token. Its P/2 rotations (cos, sin) are computed once in f64
// (the angle pos theta^(-2i/P) reaches 1e5 rad at long positions, where an f32 angle would be
// off by 2^-7 rad) and rounded to f32 in shared memory; then every head's pairs (x_i, x_i+P/2)
// are rotated in f32, two pairs per thread, and stored in the input's dtype (bf16 or f32).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "layers/rope/rope.h"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ float2 load2(const T* p) {
  if constexpr (sizeof(T) == 2)
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  else
    return *reinterpret_cast<const float2*>(p);
}
template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  if constexpr (sizeof(T) == 2)
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  else
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

template <typename T>
__global__ void rope_kernel(const T* x, T* y, const int32_t* positions, int heads, int p,
                            double log2_theta, float sign) {
  extern __shared__ float cs[];  // cos [P/2], then sin [P/2]
  const int half = p / 2;
  const int64_t token = blockIdx.x;
  const double pos = positions[token];
  for (int i = threadIdx.x; i < half; i += kThreads) {
    double s, c;
    sincos(pos * exp2(-2.0 * i / p * log2_theta), &s, &c);
    cs[i] = float(c), cs[half + i] = sign * float(s);
  }
  __syncthreads();
  const int pairs = half / 2;  // two rotations per thread
  for (int k = threadIdx.x; k < heads * pairs; k += kThreads) {
    const int h = k / pairs, i = 2 * (k % pairs);
    const int64_t row = (token * heads + h) * p;
    const float2 a = load2(x + row + i), b = load2(x + row + half + i);
    const float c0 = cs[i], c1 = cs[i + 1], s0 = cs[half + i], s1 = cs[half + i + 1];
    store2(y + row + i, a.x * c0 - b.x * s0, a.y * c1 - b.y * s1);
    store2(y + row + half + i, b.x * c0 + a.x * s0, b.y * c1 + a.y * s1);
  }
}

}  // namespace

void rope_cuda(const void* x, void* y, const int32_t* positions, int64_t tokens, int64_t heads,
               int64_t p, double theta, bool bf16, bool inverse, void* stream) {
  if (tokens == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t smem = sizeof(float) * size_t(p);
  const double lt = std::log2(theta);
  const float sign = inverse ? -1.f : 1.f;
  if (bf16)
    rope_kernel<<<unsigned(tokens), kThreads, smem, s>>>(static_cast<const __nv_bfloat16*>(x),
                                                         static_cast<__nv_bfloat16*>(y), positions,
                                                         int(heads), int(p), lt, sign);
  else
    rope_kernel<<<unsigned(tokens), kThreads, smem, s>>>(static_cast<const float*>(x),
                                                         static_cast<float*>(y), positions,
                                                         int(heads), int(p), lt, sign);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
