// Fast device math and asynchronous copies shared by the CUDA kernels (CUDA sources only):
// ex2.approx, a branch-free softplus and sigmoid with their error bounds, a warp sum, and
// cp.async staging.
#pragma once

#include <cstdint>

namespace braid {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLog2eLo = 1.925963033e-8f;  // log2(e) - kLog2e
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(y), y = e^-|x| in (0, 1], with
// log1p(y) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = y / (2 + y) in (0, 1/3]: the series
// cut after s^12/13 errs by < s^14/15 < 1.4e-8 (relative), so the result is within a few ulp
// (ex2.approx and rcp.approx add 2^-22 and 1 ulp), branch-free, in half of log1pf's instructions.
// Above 20 it is x, as in mamba_ssm.
__device__ __forceinline__ float softplus(float x) {
  // e^-|x| = 2^(m log2 e), m = -|x|; the rounding error of the product m log2(e) (up to |x| 2^-24
  // relative to the result) is put back to first order.
  const float m = -fabsf(x), e = m * kLog2e;
  const float err = fmaf(m, kLog2e, -e) + m * kLog2eLo;
  const float y = ex2(e) * fmaf(err, kLn2, 1.f);
  float r;  // 1 / (2 + y), 2 + y in [2, 3]
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(2.f + y));
  const float s = y * r, s2 = s * s;
  float poly = 1.f / 13.f;
  poly = poly * s2 + 1.f / 11.f;
  poly = poly * s2 + 1.f / 9.f;
  poly = poly * s2 + 1.f / 7.f;
  poly = poly * s2 + 1.f / 5.f;
  poly = poly * s2 + 1.f / 3.f;
  poly = poly * s2 + 1.f;
  const float sp = fmaxf(x, 0.f) + 2.f * s * poly;
  return x > 20.f ? x : sp;
}
// 1 / (1 + e^-x) with ex2.approx and rcp.approx (flush-to-zero: no denormal fix-ups), each
// within 2^-22 relative: a handful of instructions against a dozen for IEEE division.
__device__ __forceinline__ float sigmoid(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + ex2(-x * kLog2e)));
  return r;
}

// Sum over the 32 lanes of a warp (a fixed butterfly: the same bits on every lane and run).
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// 16-byte asynchronous copy global -> shared (cp.async, Ampere and later); zero-filled when
// !valid (gmem must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace braid
