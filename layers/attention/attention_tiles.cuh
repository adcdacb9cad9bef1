// Device helpers shared by the attention kernels (CUDA sources only): document bounds of a
// packed row by binary search over its non-decreasing seq_idx, and the row maximum of the
// fragment layout of layers/common/cuda_mma.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "layers/attention/attention_cuda.h"
#include "layers/common/cuda_mma.cuh"

namespace braid::attn {

using bf16 = __nv_bfloat16;

// First position of t's document (0 without documents).
__device__ __forceinline__ int doc_start(const int32_t* seq, int t) {
  if (!seq) return 0;
  const int32_t id = seq[t];
  int lo = 0, hi = t;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (seq[mid] < id)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}
// One past the last position of t's document (T without documents).
__device__ __forceinline__ int doc_end(const int32_t* seq, int t, int T) {
  if (!seq) return T;
  const int32_t id = seq[t];
  int lo = t + 1, hi = T;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (seq[mid] <= id)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Maximum over the four threads that share a row of a fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// One step of the online softmax on a 16 x 8 NT fragment of raw scores s for keys c0 ..
// c0 + 8 NT - 1 (rows row[0], row[1] of this thread). When `mask` (tiles that cross the diagonal
// or a document start) the keys a row does not see (past the row, or before its document's
// first key first[r]) are hidden. With x = s scale_log2 (base 2), per row:
//   m' = max(m, max_s x),  alpha = 2^(m - m'),  p = 2^(x - m'),  l' = l alpha + sum_s p
// computed as one FFMA per score; s becomes p. A row with no visible key yet keeps m = -inf and
// gets base 0, so its p and alpha are 0.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], bool mask, int c0,
                                               const int (&row)[2], const int (&first)[2],
                                               float scale_log2, float (&m)[2], float (&l)[2],
                                               float (&alpha)[2]) {
  const int lane = threadIdx.x & 31;
  float x[2] = {-INFINITY, -INFINITY};
  if (mask) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = c0 + nt * 8 + 2 * (lane & 3) + (e & 1), r = e / 2;
        if (col > row[r] || col < first[r]) s[nt][e] = -INFINITY;
        x[r] = fmaxf(x[r], s[nt][e]);
      }
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e / 2] = fmaxf(x[e / 2], s[nt][e]);
  }
  float base[2], sum[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float n = fmaxf(m[r], quad_max(x[r]) * scale_log2);
    base[r] = n == -INFINITY ? 0.f : n;
    alpha[r] = ex2(m[r] - base[r]);
    m[r] = n;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = ex2(fmaf(s[nt][e], scale_log2, -base[e / 2]));
      sum[e / 2] += s[nt][e];
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];
}

// o (16 x 8 NT) *= alpha per row.
template <int NT>
__device__ __forceinline__ void scale_rows(float (&o)[NT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e / 2];
}
// scale_rows, skipped when no row's maximum moved (alpha = 1), as happens on most tiles far from a
// row's start (not before warpgroup products, for which a branch on data serialises them).
template <int NT>
__device__ __forceinline__ void rescale(float (&o)[NT][4], const float (&alpha)[2]) {
  if (alpha[0] == 1.f && alpha[1] == 1.f) return;
  scale_rows<NT>(o, alpha);
}

// Writes this warp's 16 x W accumulator (rows row0 + {lane / 4, lane / 4 + 8}) times `f` as bf16
// through the warp's own rows of the shared tile `s` (row stride W + 8), then copies the rows
// [0, valid) for which keep(row) holds to global memory (row stride gs) with 16-byte stores.
template <int W, typename Keep>
__device__ __forceinline__ void store_rows(const float (&acc)[W / 8][4], float fa, float fb,
                                           bf16* s, int row0, bf16* g, int64_t gs, int valid,
                                           Keep keep) {
  constexpr int kLd = W + 8;
  const int lane = threadIdx.x & 31, r = row0 + lane / 4, c = 2 * (lane & 3);
#pragma unroll
  for (int nt = 0; nt < W / 8; ++nt) {
    *reinterpret_cast<uint32_t*>(s + r * kLd + nt * 8 + c) =
        pack_bf16(acc[nt][0] * fa, acc[nt][1] * fa);
    *reinterpret_cast<uint32_t*>(s + (r + 8) * kLd + nt * 8 + c) =
        pack_bf16(acc[nt][2] * fb, acc[nt][3] * fb);
  }
  __syncwarp();
  constexpr int kVec = W / 8;
  for (int i = lane; i < 16 * kVec; i += 32) {
    const int rr = i / kVec, v = i % kVec;
    if (row0 + rr < valid && keep(row0 + rr))
      *reinterpret_cast<uint4*>(g + (row0 + rr) * gs + v * 8) =
          *reinterpret_cast<const uint4*>(s + (row0 + rr) * kLd + v * 8);
  }
}

}  // namespace braid::attn
