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

// Scales a 16 x 8 NT fragment of scores for keys c0 .. c0 + 8 NT - 1 to base 2 (x = s scale)
// and, when `mask` (tiles that cross the diagonal or a document start), hides (-inf) the keys a
// row does not see: past the row (row[r]) or before its document (first[r]). x_max gets each
// row's maximum over this thread's columns.
template <int NT>
__device__ __forceinline__ void scale_mask(float (&s)[NT][4], bool mask, int c0,
                                           const int (&row)[2], const int (&first)[2], float scale,
                                           float (&x_max)[2]) {
  const int lane = threadIdx.x & 31;
  x_max[0] = x_max[1] = -INFINITY;
  if (mask) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = c0 + nt * 8 + 2 * (lane & 3) + (e & 1), r = e / 2;
        s[nt][e] = col > row[r] || col < first[r] ? -INFINITY : s[nt][e] * scale;
        x_max[r] = fmaxf(x_max[r], s[nt][e]);
      }
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= scale;
        x_max[e / 2] = fmaxf(x_max[e / 2], s[nt][e]);
      }
  }
}

// Writes this warp's 16 x W accumulator (rows row0 + {lane / 4, lane / 4 + 8}) times `f` as bf16
// through the warp's own rows of the shared tile `s` (row stride W + 8), then copies the rows
// [0, valid) to global memory (row stride gs) with 16-byte stores.
template <int W>
__device__ __forceinline__ void store_rows(const float (&acc)[W / 8][4], float fa, float fb,
                                           bf16* s, int row0, bf16* g, int64_t gs, int valid) {
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
    if (row0 + rr < valid)
      *reinterpret_cast<uint4*>(g + (row0 + rr) * gs + v * 8) =
          *reinterpret_cast<const uint4*>(s + (row0 + rr) * kLd + v * 8);
  }
}

}  // namespace braid::attn
