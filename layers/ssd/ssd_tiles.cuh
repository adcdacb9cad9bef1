// Shared pieces of the SSD kernels (CUDA sources only): 64-token tiles staged in shared memory
// by cp.async, the per-token scalars of a tile, and block-wide sums and scans. The tile products
// use the warp-level fragments of layers/common/cuda_mma.cuh.
//
// Every product kernel runs kThreads = 128 threads: warp w owns rows [16 w, 16 w + 16) of a
// 64-row output tile. Shared-memory tiles are row-major with rows padded by kPad elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/common/cuda_mma.cuh"
#include "layers/ssd/ssd_cuda.h"

namespace braid::ssd {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;
constexpr int kRows = kSsdBlock;  // 64 rows per tile, 16 per warp
constexpr int kPad = 8;

__device__ __forceinline__ int warp_row0() {
  return (threadIdx.x >> 5) * 16;
}

// Stages rows [0, rows) x columns [0, W) into a padded shared tile (load_rows).
template <int W>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int64_t gs, int rows, int valid) {
  static_assert(kPad == 8, "load_rows pads rows by 8 elements");
  load_rows<W, kThreads>(s, g, gs, rows, valid);
}

// The scalars of one 64-token tile of a (b, h) lane: a (the chunk's cumulative dt A), dt and the
// document id (the tokens past the end repeat the last token's); w: a kernel's per-token weight.
struct TokenInfo {
  float a[kRows];
  float dt[kRows];
  int doc[kRows];
  float w[kRows];
};
__device__ __forceinline__ int doc_at(const SsdParams& p, int b, int64_t t) {
  if (!p.seq_idx) return 0;
  return p.seq_idx[int64_t(b) * p.seqlen + (t < p.seqlen ? t : p.seqlen - 1)];
}
// Fills `info` for tokens t0 .. t0 + 63 (t0 = chunk start + tile offset); call with all threads,
// then synchronise.
__device__ __forceinline__ void load_info(TokenInfo& info, const SsdParams& p, int b, int h,
                                          int64_t t0) {
  const int i = threadIdx.x;
  if (i < kRows) {
    const int64_t lane = (int64_t(b) * p.heads + h) * p.geo.tpad + t0 + i;
    info.a[i] = p.ws[p.geo.acs + lane];
    info.dt[i] = p.ws[p.geo.dt + lane];
    info.doc[i] = doc_at(p, b, t0 + i);
  }
}

// Block-wide (blockDim.x threads, a multiple of 32, at most 1024) sum and inclusive scans, in a
// fixed order; `sh` holds blockDim.x floats. Every thread must call them.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) s += sh[w];
  return s;
}
template <bool kReverse>
__device__ __forceinline__ float block_scan(float v, float* sh) {
  const int i = threadIdx.x, n = blockDim.x;
  __syncthreads();
  sh[i] = v;
  __syncthreads();
  for (int off = 1; off < n; off *= 2) {
    const int j = kReverse ? i + off : i - off;
    const float o = (j >= 0 && j < n) ? sh[j] : 0.f;
    __syncthreads();
    sh[i] += o;
    __syncthreads();
  }
  return sh[i];
}

// Kernels that the forward and the backward share (ssd_fwd.cu): the chunk's own state term (the
// backward: its state gradient), the pass over the chunks (forward or reverse) and the tile
// products of the chunk scan: y (forward), dy_i . (y_i - D x_i) (backward: r) or dx (backward).
enum class ScanMode { y, r, dx };
void launch_chunk_state(const SsdParams& p, bool grad, cudaStream_t stream);
void launch_state_pass(const SsdParams& p, bool grad, cudaStream_t stream);
void launch_chunk_scan(const SsdParams& p, ScanMode mode, cudaStream_t stream);
// Whether the fused Hopper kernels run (p.hopper, an sm_90 device, d_state 64 or 128), and
// those kernels: the forward after prep (ssd_fwd_hopper.cu), the backward's state gradient and
// dx (ssd_bwd_hopper.cu), each with the tiles' scores first.
bool use_hopper(const SsdParams& p);
void launch_fused_fwd(const SsdParams& p, cudaStream_t stream);
void launch_fused_bwd(const SsdParams& p, cudaStream_t stream);

}  // namespace braid::ssd
