// Shared pieces of the fused Hopper SSD kernels (ssd_fwd_hopper.cu, ssd_bwd_hopper.cu; CUDA
// sources only, sm_90a). Both run one block of kFusedThreads per (head, 64 channels of P, batch
// row), walking the sequence in 64-token tiles (forward in order, backward in reverse) with a
// [64 p, N] state (the backward: its gradient) in the f32 accumulators of one warpgroup, and
// hand it in bf16 to a second warpgroup through two shared buffers. Operands are 128-byte-
// swizzled panels of 64 rows x 64 bf16 (cuda_wgmma.cuh). N (d_state) is 64 or 128: a [64, 256]
// state needs 128 accumulators a thread, past the 168 registers ptxas allows a thread of 384.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "layers/common/cuda_tma.cuh"
#include "layers/common/cuda_wgmma.cuh"
#include "layers/ssd/ssd_tiles.cuh"
#include "runtime/check.h"

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

// f(std::integral_constant<int, N>) for the kernels' d_state N (64 or 128); else fails naming
// `what`.
template <class F>
void with_d_state(const SsdParams& p, const char* what, F&& f) {
  if (p.d_state == 64)
    f(std::integral_constant<int, 64>{});
  else if (p.d_state == 128)
    f(std::integral_constant<int, 128>{});
  else
    BRAID_FAIL("ssd (CUDA): no ", what, " for d_state ", p.d_state);
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

// A fused block: its head h, 64 channels from 64 ps, batch row b, group g and tiles, the offset
// of (b, h) in the [B,H,Tpad] arrays, and its 2 stages + 4 mbarriers (at `bars`): full and
// empty per stage (the producer's arrival with the copies' bytes; every consumer thread), ready
// and freed per state buffer (a warpgroup each). Every thread constructs it: thread 0 initialises
// the barriers, then the block synchronises.
struct FusedBlock {
  int h, ps, b, g, ntiles;
  int64_t lane_off;
  uint64_t *full, *empty, *ready, *freed;
  __device__ __forceinline__ FusedBlock(const SsdParams& p, uint64_t* bars, int stages) {
    const int slices = p.head_dim / 64;
    h = blockIdx.x / slices, ps = blockIdx.x % slices, b = blockIdx.y;
    g = h / (p.heads / p.groups), ntiles = (p.seqlen + kRows - 1) / kRows;
    lane_off = (int64_t(b) * p.heads + h) * p.geo.tpad;
    full = bars, empty = full + stages, ready = empty + stages, freed = ready + 2;
    if (threadIdx.x == 0) {
      for (int s = 0; s < stages; ++s) mbar_init(full + s, 1), mbar_init(empty + s, 256);
      for (int i = 0; i < 2; ++i) mbar_init(ready + i, 128), mbar_init(freed + i, 128);
      mbar_init_fence();
    }
    __syncthreads();
  }
};
// The dynamic shared memory from its first 1024-byte boundary (where swizzled panels start).
__device__ __forceinline__ bf16* aligned_smem(unsigned char* raw) {
  return reinterpret_cast<bf16*>(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023));
}
// This thread's warpgroup, warp-uniform as the compiler sees it (read through a shuffle), so that
// the products are not taken for a divergent path (which serialises them).
__device__ __forceinline__ int warpgroup() {
  return __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);
}

// A tile's token data in its stage (`sc`: a, dt and documents of its 64 tokens), its first token
// t0 and last valid row, and a_p and doc_S: the a and document of the token before it (given as
// a_before, doc_before), 0 at a chunk's start and the tile's own first document at the sequence's.
struct TileData {
  const float *a, *dt;
  const int* doc;
  int64_t t0;
  int last;
  float a_prev;
  int doc_s;
  __device__ __forceinline__ TileData(const SsdParams& p, const float* sc, int64_t first,
                                      float a_before, int doc_before)
      : a(sc), dt(sc + 64), doc(reinterpret_cast<const int*>(sc + 128)), t0(first) {
    last = int(min(int64_t(kRows), p.seqlen - t0)) - 1;
    a_prev = t0 % p.chunk == 0 ? 0.f : a_before;
    doc_s = t0 == 0 ? doc[0] : doc_before;
  }
};

// acc (=) A B^T over K: A [64 rows, K] and B [64 rows, K] in K-major swizzled panels.
template <int K>
__device__ __forceinline__ void wgmma_kmajor(float (&acc)[8][4], const bf16* a, const bf16* b) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
    wgmma_m64n64_ss<0, 0>(acc, wgmma_desc_sw128(a + (kk / 4) * kPanel + (kk % 4) * 16, 16),
                          wgmma_desc_sw128(b + (kk / 4) * kPanel + (kk % 4) * 16, 16), kk > 0);
}

// Element offset of (row, col) in a 128-byte-swizzled panel of 64 columns.
__device__ __forceinline__ int sw(int row, int col) {
  return row * 64 + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
}

// acc (64 x NB) += A (registers) B (descriptor, MN-major).
template <int NB>
__device__ __forceinline__ void wgmma_rs_mn(float (&acc)[NB / 8][4], const uint32_t (&a)[4],
                                            uint64_t b) {
  if constexpr (NB == 64)
    wgmma_m64n64_rs<1>(acc, a, b, 1);
  else
    wgmma_m64n128_rs<1>(acc, a, b, 1);
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
  for (int kk = 0; kk < 4; ++kk)
    wgmma_rs_mn<N>(s, af[kk], wgmma_desc_sw128(vs + kk * 16 * 64, kPanel * 2));
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_reg_fence(s);
}

// s in bf16 into the swizzled panels `dst` (the other warpgroup's operand), and then handed over
// (mbarrier `ready`); then, when given, into the row-major [64, N] `out` (the workspace's chunk
// states), after the handover so that the other warpgroup does not wait for those stores.
template <int N>
__device__ __forceinline__ void hand_over_bf16(const float (&s)[N / 8][4], bf16* dst,
                                               uint64_t* ready, bf16* out) {
  const int lane = threadIdx.x & 31, r0 = ((threadIdx.x >> 5) & 3) * 16 + (lane >> 2);
  auto each = [&](auto&& f) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        f(r0 + 8 * half, nt * 8 + 2 * (lane & 3), pack_bf16(s[nt][2 * half], s[nt][2 * half + 1]));
  };
  each([&](int row, int col, uint32_t v) {
    *reinterpret_cast<uint32_t*>(dst + (col / 64) * kPanel + sw(row, col % 64)) = v;
  });
  fence_proxy_async();  // the stores, before the other warpgroup's products read them
  mbar_arrive(ready);
  if (out)
    each([&](int row, int col, uint32_t v) {
      *reinterpret_cast<uint32_t*>(out + int64_t(row) * N + col) = v;
    });
}

// The product warpgroup's step: acc = A V (A: the weighted scores in registers, V [64 tokens,
// 64 p] panel vs, MN-major), then, once the state buffer `ss` is ready (mbarrier `ready`),
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
  wgmma_kmajor<N>(acc_s, us, ss);
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
