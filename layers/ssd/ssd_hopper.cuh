// Shared pieces of the fused Hopper SSD kernels (ssd_fwd_hopper.cu, ssd_bwd_hopper.cu; CUDA
// sources only, sm_90a). Both run one block of kFusedThreads per (head, 64 channels of P, batch
// row), walking the sequence in 64-token tiles (forward in order, backward in reverse) with a
// [64 p, N] state (the backward: its gradient) in the f32 accumulators of one warpgroup, and
// hand it in bf16 to a second warpgroup through two shared buffers. Operands are 128-byte-
// swizzled panels of 64 rows x 64 bf16 (cuda_wgmma.cuh). N (d_state) is 64 or 128: a [64, 256]
// state needs 128 accumulators a thread, past the 168 registers ptxas allows a thread of 384.
#pragma once

#include <cuda_runtime.h>

#include "layers/common/cuda_tma.cuh"
#include "layers/common/cuda_wgmma.cuh"
#include "layers/ssd/ssd_tiles.cuh"

namespace braid::ssd {

constexpr int kFusedThreads = 384;  // producer, state, and product warpgroups
constexpr int kPanel = kRows * 64;  // elements of a swizzled panel: 64 rows x 64 bf16 (8 KB)

// Index (in uint4) of thread `lane` of warp `warp`, k slice kk, in the scores of `tile`
// (launch_scores).
__device__ __forceinline__ int64_t score_frag(const SsdParams& p, int b, int tile, int g, int warp,
                                              int kk, int lane) {
  const int64_t tiles = p.geo.tpad / kRows;
  return ((((int64_t(b) * tiles + tile) * p.groups + g) * 4 + warp) * 4 + kk) * 32 + lane;
}

// Per (64-token tile, group, batch row): C_i . B_j for i, j in the tile (transposed: B_j . C_i,
// rows j), rounded to bf16 and stored at score_frag in the A-fragment order of a warpgroup's
// 64 x 64 operand, into the workspace's scores (ssd_fwd_hopper.cu).
void launch_scores(const SsdParams& p, bool transposed, cudaStream_t stream);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The state buffers change hands through mbarriers of 128 arrivals each: the m-th state handed
// over is in buffer m % 2 once ready[m % 2] completes its phase m / 2 (the state warpgroup's
// threads arrive after their stores), and the product warpgroup's threads arrive on
// freed[m % 2] once their products have read it.
__device__ __forceinline__ void wait_freed(uint64_t* freed, int m) {
  if (m >= 2) mbar_wait(freed + (m & 1), ((m >> 1) - 1) & 1);
}
__device__ __forceinline__ void wait_ready(uint64_t* ready, int m) {
  mbar_wait(ready + (m & 1), (m >> 1) & 1);
}

// Element offset of (row, col) in a 128-byte-swizzled panel of 64 columns.
__device__ __forceinline__ int sw(int row, int col) {
  return row * 64 + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
}

// The state warpgroup's step, s ([64 p, N]: this thread's rows r0, r0 + 8 (r0 = 16 warp +
// lane / 4), columns 8 nt + 2 (lane % 4) + {0, 1}):
//   s = keep s + (U^T diag(w)) V,  U [64 tokens, 64 p] (panel us), V [64 tokens, N] (panels vs),
// with w2(j) = (w_j, w_j+1); U^T diag(w) is rounded to bf16 as the product's A operand.
template <int N, class W2>
__device__ __forceinline__ void state_step(float (&s)[N / 8][4], float keep, const bf16* us,
                                           const bf16* vs, W2&& w2) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, q = lane & 3;
  uint32_t af[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    ldsm4t(af[kk], us + sw(16 * kk + (lane & 7) + ((lane >> 4) & 1) * 8,
                           warp * 16 + ((lane >> 3) & 1) * 8));
    const float2 lo = w2(16 * kk + 2 * q), hi = w2(16 * kk + 2 * q + 8);
    af[kk][0] = scale_bf16x2(af[kk][0], lo.x, lo.y);
    af[kk][1] = scale_bf16x2(af[kk][1], lo.x, lo.y);
    af[kk][2] = scale_bf16x2(af[kk][2], hi.x, hi.y);
    af[kk][3] = scale_bf16x2(af[kk][3], hi.x, hi.y);
  }
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= keep;
  wgmma_reg_fence(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t desc = wgmma_desc_sw128(vs + kk * 16 * 64, kPanel * 2);
    if constexpr (N == 64)
      wgmma_m64n64_rs<1>(s, af[kk], desc, 1);
    else
      wgmma_m64n128_rs<1>(s, af[kk], desc, 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_reg_fence(s);
}

// s in bf16 into the swizzled panels `dst` (the other warpgroup's operand) and, when given, into
// the row-major [64, N] `out` (the workspace's chunk states).
template <int N>
__device__ __forceinline__ void store_state_bf16(const float (&s)[N / 8][4], bf16* dst, bf16* out) {
  const int lane = threadIdx.x & 31, r0 = ((threadIdx.x >> 5) & 3) * 16 + (lane >> 2);
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + 8 * half, col = nt * 8 + 2 * (lane & 3);
      const uint32_t v = pack_bf16(s[nt][2 * half], s[nt][2 * half + 1]);
      *reinterpret_cast<uint32_t*>(dst + (col / 64) * kPanel + sw(row, col % 64)) = v;
      if (out) *reinterpret_cast<uint32_t*>(out + int64_t(row) * N + col) = v;
    }
}

// The product warpgroup's step: acc = A V (A: the weighted scores in registers, V [64 tokens,
// 64 p] panel vs, MN-major), then, once the state buffer `ss` is ready (named barrier `ready`),
// acc_s = U S^T (U [64 rows, N] panels us, S [64 p, N] panels ss, both K-major): S is the m-th
// state handed over.
template <int N>
__device__ __forceinline__ void tile_products(float (&acc)[8][4], float (&acc_s)[8][4],
                                              const uint32_t (&af)[4][4], const bf16* vs,
                                              const bf16* us, const bf16* ss, uint64_t* ready,
                                              int m) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    wgmma_m64n64_rs<1>(acc, af[kk], wgmma_desc_sw128(vs + kk * 16 * 64, kPanel * 2), kk > 0);
  wgmma_commit();
  wait_ready(ready, m);
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk)
    wgmma_m64n64_ss<0, 0>(acc_s, wgmma_desc_sw128(us + (kk / 4) * kPanel + (kk % 4) * 16, 16),
                          wgmma_desc_sw128(ss + (kk / 4) * kPanel + (kk % 4) * 16, 16), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_reg_fence(acc);
  wgmma_reg_fence(acc_s);
}

// The scores' A fragments weighted: register r of k slice kk holds row r0 + 8 (r & 1) and
// columns j, j + 1 with j = 16 kk + 2 (lane % 4) + 8 (r >> 1); w2(half, j) gives their weights.
template <class W2>
__device__ __forceinline__ void weigh_scores(uint32_t (&af)[4][4], const uint4 (&cb)[4], W2&& w2) {
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t c[4] = {cb[kk].x, cb[kk].y, cb[kk].z, cb[kk].w};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float2 w = w2(r & 1, 16 * kk + 2 * q + 8 * (r >> 1));
      af[kk][r] = scale_bf16x2(c[r], w.x, w.y);
    }
  }
}
#endif

}  // namespace braid::ssd
