// Warp-level bf16 tensor-core products (CUDA sources only): mma.sync m16n8k16 with f32
// accumulation, operands read from shared memory with ldmatrix, results fed back as A operands.
//
// Fragments: warp-level 16-row tiles. An accumulator of 16 x 8 NT holds, in thread `lane`, the
// rows lane / 4 (elements 0, 1) and lane / 4 + 8 (elements 2, 3) at the columns
// 8 nt + 2 (lane % 4) + {0, 1}. A fragment that is a product's result feeds the next product as
// its A operand without leaving the registers (to_afrag). Shared tiles are row-major; padding
// each row by 16 bytes puts the 8 rows read by one ldmatrix in 8 different bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "layers/common/cuda_fast_math.cuh"

namespace braid {

__device__ __forceinline__ int lane_id() {
  return threadIdx.x & 31;
}

// Stages rows [0, rows) x columns [0, W) of a bf16 matrix with row stride gs (elements) into a
// shared tile with rows of W + 8 elements, by cp.async from kThreads threads; rows at or past
// `valid` are zero-filled (g must point into the matrix). The caller commits and waits.
template <int W, int kThreads>
__device__ __forceinline__ void load_rows(__nv_bfloat16* s, const __nv_bfloat16* g, int64_t gs,
                                          int rows, int valid) {
  constexpr int kVec = W / 8;
  for (int i = threadIdx.x; i < rows * kVec; i += kThreads) {
    const int r = i / kVec, v = i % kVec;
    const bool ok = r < valid;
    cp_async16(s + r * (W + 8) + v * 8, ok ? g + r * gs + v * 8 : g, ok);
  }
}

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const __nv_bfloat16* ptr) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const __nv_bfloat16* ptr) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t v, float f0, float f1) {
  const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  return pack_bf16(x.x * f0, x.y * f1);
}
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t v, float f) {
  return scale_bf16x2(v, f, f);
}

// A operand (16 rows x 16 k) at k0 of a shared tile whose rows are the product's rows (k
// contiguous: kKMajor) or whose rows are k (the rows contiguous).
template <bool kKMajor>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int row0,
                                       int k0) {
  const int l = lane_id();
  if (kKMajor)
    ldsm4(a, s + (row0 + (l & 15)) * ld + k0 + (l >> 4) * 8);
  else
    ldsm4t(a, s + (k0 + (l >> 4) * 8 + (l & 7)) * ld + row0 + ((l >> 3) & 1) * 8);
}
// B operand of two n-tiles (n0, n0 + 8) x 16 k at k0: b[0], b[1] for n0 and b[2], b[3] for
// n0 + 8, from a shared tile stored [n][k] (kKMajor) or [k][n].
template <bool kKMajor>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const __nv_bfloat16* s, int ld, int n0,
                                       int k0) {
  const int l = lane_id();
  if (kKMajor)
    ldsm4(b, s + (n0 + (l >> 4) * 8 + (l & 7)) * ld + k0 + ((l >> 3) & 1) * 8);
  else
    ldsm4t(b, s + (k0 + ((l >> 3) & 1) * 8 + (l & 7)) * ld + n0 + (l >> 4) * 8);
}

// acc (this warp's 16 rows x 8 NT) += A (16 x K) B (K x 8 NT). A: rows [row0, row0 + 16) and k
// [ka, ka + K) of tile `a` (layout kAK as in load_a); B: k [kb, kb + K), n [0, 8 NT) of tile `b`.
// Rows of A are scaled by (f0, f1) (rows lane / 4 and lane / 4 + 8) when kScale.
template <int NT, int K, bool kAK, bool kBK, bool kScale = false>
__device__ __forceinline__ void mma_ss(float (&acc)[NT][4], const __nv_bfloat16* a, int lda,
                                       int row0, int ka, const __nv_bfloat16* b, int ldb, int kb,
                                       float f0 = 1.f, float f1 = 1.f) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    uint32_t af[4];
    load_a<kAK>(af, a, lda, row0, ka + k);
    if (kScale) {
      af[0] = scale_bf16x2(af[0], f0), af[2] = scale_bf16x2(af[2], f0);
      af[1] = scale_bf16x2(af[1], f1), af[3] = scale_bf16x2(af[3], f1);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t bf[4];
      load_b<kBK>(bf, b, ldb, nt * 8, kb + k);
      mma16816(acc[nt], af, bf[0], bf[1]);
      mma16816(acc[nt + 1], af, bf[2], bf[3]);
    }
  }
}

// The A operand fragments of a 16 x 8 NT accumulator, rounded to __nv_bfloat16 (k slices of 16).
template <int NT>
__device__ __forceinline__ void to_afrag(const float (&s)[NT][4], uint32_t (&a)[NT / 2][4]) {
#pragma unroll
  for (int t = 0; t < NT / 2; ++t) {
    a[t][0] = pack_bf16(s[2 * t][0], s[2 * t][1]);
    a[t][1] = pack_bf16(s[2 * t][2], s[2 * t][3]);
    a[t][2] = pack_bf16(s[2 * t + 1][0], s[2 * t + 1][1]);
    a[t][3] = pack_bf16(s[2 * t + 1][2], s[2 * t + 1][3]);
  }
}

// acc (16 x 8 NT) += A (16 x 16 KT, register fragments) B (16 KT x 8 NT, tile `b` as in load_b).
template <int NT, int KT, bool kBK>
__device__ __forceinline__ void mma_rs(float (&acc)[NT][4], const uint32_t (&a)[KT][4],
                                       const __nv_bfloat16* b, int ldb) {
#pragma unroll
  for (int k = 0; k < KT; ++k) {
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t bf[4];
      load_b<kBK>(bf, b, ldb, nt * 8, k * 16);
      mma16816(acc[nt], a[k], bf[0], bf[1]);
      mma16816(acc[nt + 1], a[k], bf[2], bf[3]);
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Sum over the four threads that share a row of a fragment.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace braid
