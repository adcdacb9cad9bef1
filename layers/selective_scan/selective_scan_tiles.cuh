// Shared pieces of the selective scan kernels (CUDA sources only): the block's place in the
// problem, staging of [channel][step] activation tiles and [state][step] B/C tiles through
// shared memory, and the fast exp2.
//
// Thread layout (both kernels): a block of kBlock = 256 threads owns kC = 16 channels of one
// group and one batch row; thread tid works on channel ch = tid / 16 and on the kItems = 8
// consecutive steps seg * 8 .. seg * 8 + 7 (seg = tid % 16) of each kL = 128-step chunk. The 16
// threads of a channel are 16 lanes of one warp, so scans over the chunk are warp shuffles.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/cuda_convert.cuh"

namespace braid::scan {

constexpr int kC = kScanChannels, kL = kScanChunk, kTpc = 16, kItems = kL / kTpc;
constexpr int kBlock = kC * kTpc;
constexpr int kNs = 16;       // states per B/C tile (a slice of N)
constexpr int kRow = kL + 2;  // activation tile row, padded (elements)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kItems == 8 && kBlock == 2 * kL, "the staging below assumes 8 items, 256 threads");

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float softplus(float x) {
  return x <= 20.f ? log1pf(__expf(x)) : x;
}
__device__ __forceinline__ float sigmoid(float x) {
  return 1.f / (1.f + __expf(-x));
}

// The block's channels and this thread's place.
struct Place {
  int b, g, c0, nch;  // batch row, group, first channel, valid channels (<= kC)
  int ch, seg, c;     // this thread's channel slot, segment and channel
  bool active;        // ch < nch
  bool vec;           // whole 16-channel blocks: 16-byte loads and stores
};
__device__ __forceinline__ Place place(const ScanParams& p) {
  Place q;
  const int cpg = p.channels / p.groups, per_group = (cpg + kC - 1) / kC;
  q.b = blockIdx.y;
  q.g = blockIdx.x / per_group;
  const int j = blockIdx.x % per_group;
  q.c0 = q.g * cpg + j * kC;
  q.nch = min(kC, cpg - j * kC);
  q.ch = threadIdx.x / kTpc, q.seg = threadIdx.x % kTpc;
  q.c = q.c0 + q.ch;
  q.active = q.ch < q.nch;
  q.vec = cpg % kC == 0;
  return q;
}

// Activation tile [kC][kRow] of one chunk (steps t0 .. t0 + kL - 1), zero outside the problem.
template <typename T>
__device__ __forceinline__ void load_tile(const ScanParams& p, const Place& q, const T* src, int t0,
                                          T* tile) {
  const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
  if (q.vec) {
    // Thread (step r, half): 8 channels in one or two 16-byte loads, transposed into the tile.
    const int r = threadIdx.x / 2, half = threadIdx.x % 2, t = t0 + r;
    constexpr int kWords = 8 * sizeof(T) / 16;
    alignas(16) T v[8];
    const uint4* s = reinterpret_cast<const uint4*>(
        src + base + static_cast<int64_t>(t) * p.channels + half * 8);
#pragma unroll
    for (int w = 0; w < kWords; ++w)
      reinterpret_cast<uint4*>(v)[w] = t < p.seqlen ? __ldg(s + w) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 8; ++j) tile[(half * 8 + j) * kRow + r] = v[j];
  } else {
    for (int i = threadIdx.x; i < kC * kL; i += kBlock) {
      const int ch = i % kC, r = i / kC, t = t0 + r;
      tile[ch * kRow + r] = ch < q.nch && t < p.seqlen
                                ? src[base + static_cast<int64_t>(t) * p.channels + ch]
                                : from_float<T>(0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_tile(const ScanParams& p, const Place& q, const T* tile,
                                           int t0, T* dst) {
  const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
  if (q.vec) {
    const int r = threadIdx.x / 2, half = threadIdx.x % 2, t = t0 + r;
    if (t >= p.seqlen) return;
    constexpr int kWords = 8 * sizeof(T) / 16;
    alignas(16) T v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = tile[(half * 8 + j) * kRow + r];
    uint4* d =
        reinterpret_cast<uint4*>(dst + base + static_cast<int64_t>(t) * p.channels + half * 8);
#pragma unroll
    for (int w = 0; w < kWords; ++w) d[w] = reinterpret_cast<const uint4*>(v)[w];
  } else {
    for (int i = threadIdx.x; i < kC * kL; i += kBlock) {
      const int ch = i % kC, r = i / kC, t = t0 + r;
      if (ch < q.nch && t < p.seqlen)
        dst[base + static_cast<int64_t>(t) * p.channels + ch] = tile[ch * kRow + r];
    }
  }
}

// B/C tiles [2][kNs][kL] f32 for states s0 .. s0 + kNs - 1 of the block's group. Step r sits at
// bc_pos(r): the two float4 halves of each 8-step segment swap places every 4 segments, so the
// 16-byte reads of 8 consecutive segments hit 32 different banks.
__device__ __forceinline__ int bc_pos(int r) {
  const int s = r >> 3, i = r & 7;
  return s * 8 + (((i >> 2) ^ ((s >> 2) & 1)) << 2) + (i & 3);
}
template <typename T>
__device__ __forceinline__ void load_bc(const ScanParams& p, const Place& q, int t0, int s0,
                                        float* bc) {
  // Thread (matrix k, step r) copies one row of up to kNs states: consecutive threads write
  // consecutive steps (no bank conflicts); the row's global reads share sectors.
  const int64_t stride_t = static_cast<int64_t>(p.groups) * p.d_state;
  const int k = threadIdx.x / kL, r = threadIdx.x % kL, t = t0 + r;
  const T* src = static_cast<const T*>(k == 0 ? p.B : p.C) +
                 static_cast<int64_t>(q.b) * p.seqlen * stride_t +
                 static_cast<int64_t>(q.g) * p.d_state + s0 + static_cast<int64_t>(t) * stride_t;
  const int valid = t < p.seqlen ? min(kNs, p.d_state - s0) : 0;
  float* dst = bc + k * kNs * kL + bc_pos(r);
#pragma unroll
  for (int nn = 0; nn < kNs; ++nn) dst[nn * kL] = nn < valid ? to_float(src[nn]) : 0.f;
}
// The 8 values of this thread's steps in one B/C tile row.
__device__ __forceinline__ void read8(const float* row, int seg, float (&v)[kItems]) {
  const int sw = (seg >> 2) & 1;
  const float4 lo = *reinterpret_cast<const float4*>(row + seg * 8 + sw * 4);
  const float4 hi = *reinterpret_cast<const float4*>(row + seg * 8 + (sw ^ 1) * 4);
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z,
  v[7] = hi.w;
}

// Document resets of this thread's steps: step t starts a new document when seq[t] != seq[t-1].
__device__ __forceinline__ void load_seq(const ScanParams& p, const Place& q, int t0, int* seq) {
  if (threadIdx.x < kL + 1) {
    const int t = t0 - 1 + threadIdx.x;  // seq[0] holds step t0 - 1
    seq[threadIdx.x] =
        t >= 0 && t < p.seqlen ? p.seq_idx[static_cast<int64_t>(q.b) * p.seqlen + t] : 0;
  }
}
__device__ __forceinline__ bool is_reset(const ScanParams& p, const int* seq, int t0, int r) {
  const int t = t0 + r;
  return t > 0 && t < p.seqlen && seq[r + 1] != seq[r];
}

// Bump allocator over dynamic shared memory (16-byte aligned pieces).
struct SmemCarver {
  unsigned char* base;
  size_t used = 0;
  template <typename U>
  __host__ __device__ U* take(size_t count) {
    U* out = reinterpret_cast<U*>(base + used);
    used += (count * sizeof(U) + 15) / 16 * 16;
    return out;
  }
};

}  // namespace braid::scan
