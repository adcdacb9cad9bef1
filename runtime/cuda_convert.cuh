// Device-side conversions between f32 and the stored element types (CUDA sources only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace braid {

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}

// Rounds to nearest even for the 16-bit types.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_float<double>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Host side: calls f with a null pointer of the row type (bf16 or f32) a kernel is launched for,
// f(static_cast<T*>(nullptr)); the lambda names it as std::remove_pointer_t<decltype(p)>.
template <typename F>
void for_row_dtype(bool bf16, F f) {
  if (bf16)
    f(static_cast<__nv_bfloat16*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

}  // namespace braid
