// Shared pieces of the selective scan kernels (CUDA sources only): for the backward the block's
// place in the problem and the staging of [channel][step] activation tiles and [state][step] B/C
// tiles through shared memory.
//
// Thread layout of the backward: a block of kBlock = 256 threads owns kC = 16 channels of one
// group and one batch row; thread tid works on channel ch = tid / 16 and on the kItems = L / 16
// consecutive steps seg * kItems .. (seg + 1) * kItems - 1 (seg = tid % 16) of each L-step chunk
// (L = 128). The 16 threads of a channel are 16 lanes of one warp, so scans over the chunk
// are warp shuffles.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/cuda_convert.cuh"

namespace braid::scan {

constexpr int kC = kScanChannels, kTpc = 16, kBlock = kC * kTpc;
constexpr int kNs = 16;  // states per B/C tile (a slice of N)
static_assert(kBlock == 256, "the staging below assumes 256 threads");

// a x for a link of the recurrence; with document resets a = 0 cuts the chain by a select, not a
// multiply (with dt < 0 a state can overflow, and a reset must still drop it).
template <bool kReset>
__device__ __forceinline__ float link(float a, float x) {
  return kReset ? (a != 0.f ? a * x : 0.f) : a * x;
}

// The 16 lanes of a channel each hold the affine map x -> A x + X of their steps. scan_up
// composes them in time order (lane 0 first) with `carry` entering at lane 0 and returns the
// value entering this lane's first step; scan_down composes them in reverse (lane 15 first,
// `carry` entering there) and returns the value arriving after this lane's last step.
template <bool kReset>
__device__ __forceinline__ float scan_up(float A, float X, float carry, int seg) {
  constexpr unsigned kMask = 0xffffffffu;
  if (seg == 0) X = link<kReset>(A, carry) + X, A = 0.f;
#pragma unroll
  for (int off = 1; off < 16; off *= 2) {
    const float Ap = __shfl_up_sync(kMask, A, off, 16), Xp = __shfl_up_sync(kMask, X, off, 16);
    if (seg >= off) X = link<kReset>(A, Xp) + X, A = link<kReset>(A, Ap);
  }
  const float in = __shfl_up_sync(kMask, X, 1, 16);
  return seg == 0 ? carry : in;
}
template <bool kReset>
__device__ __forceinline__ float scan_down(float A, float X, float carry, int seg) {
  constexpr unsigned kMask = 0xffffffffu;
  if (seg == 15) X = link<kReset>(A, carry) + X, A = 0.f;
#pragma unroll
  for (int off = 1; off < 16; off *= 2) {
    const float Ap = __shfl_down_sync(kMask, A, off, 16), Xp = __shfl_down_sync(kMask, X, off, 16);
    if (seg + off < 16) X = link<kReset>(A, Xp) + X, A = link<kReset>(A, Ap);
  }
  const float in = __shfl_down_sync(kMask, X, 1, 16);
  return seg == 15 ? carry : in;
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

// Shared-memory tiles of one L-step chunk.
template <int L>
struct Tiles {
  static constexpr int kItems = L / kTpc;  // steps per thread
  static constexpr int kRow = L + 8;       // activation tile row: padded, 16-byte aligned
  // An activation tile is [kC][kRow] with channels 8-15 shifted by 64 bytes (16 banks): when a
  // warp transposes 16-byte pieces (step r, channels 8 half .. 8 half + 7) into the tile, the two
  // halves of the warp write different banks.
  template <typename T>
  static constexpr __host__ __device__ int tile_elems() {
    return kC * kRow + 64 / static_cast<int>(sizeof(T));
  }
  template <typename T>
  static __device__ __forceinline__ int row(int ch) {
    return ch * kRow + (ch >= 8 ? 64 / static_cast<int>(sizeof(T)) : 0);
  }
  static constexpr int kQuads = kItems / 4;
  static_assert(L % 128 == 0 && kItems % 4 == 0, "chunks of 128 or 256 steps");

  // Activation tile [kC][kRow] (steps t0 .. t0 + L - 1), zero outside the problem.
  template <typename T>
  static __device__ __forceinline__ void load(const ScanParams& p, const Place& q, const T* src,
                                              int t0, T* tile) {
    const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
    if (q.vec) {
      // Thread (step r, half): 8 channels in one or two 16-byte loads, transposed into the tile.
      constexpr int kWords = 8 * sizeof(T) / 16;
      const int half = threadIdx.x % 2;
#pragma unroll
      for (int r = threadIdx.x / 2; r < L; r += kBlock / 2) {
        const int t = t0 + r;
        alignas(16) T v[8];
        const uint4* s = reinterpret_cast<const uint4*>(
            src + base + static_cast<int64_t>(t) * p.channels + half * 8);
#pragma unroll
        for (int w = 0; w < kWords; ++w)
          reinterpret_cast<uint4*>(v)[w] = t < p.seqlen ? __ldg(s + w) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < 8; ++j) tile[row<T>(half * 8) + j * kRow + r] = v[j];
      }
    } else {
      for (int i = threadIdx.x; i < kC * L; i += kBlock) {
        const int ch = i % kC, r = i / kC, t = t0 + r;
        tile[row<T>(ch) + r] = ch < q.nch && t < p.seqlen
                                   ? src[base + static_cast<int64_t>(t) * p.channels + ch]
                                   : from_float<T>(0.f);
      }
    }
  }

  template <typename T>
  static __device__ __forceinline__ void store(const ScanParams& p, const Place& q, const T* tile,
                                               int t0, T* dst) {
    const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
    if (q.vec) {
      constexpr int kWords = 8 * sizeof(T) / 16;
      const int half = threadIdx.x % 2;
#pragma unroll
      for (int r = threadIdx.x / 2; r < L; r += kBlock / 2) {
        const int t = t0 + r;
        if (t >= p.seqlen) break;
        alignas(16) T v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = tile[row<T>(half * 8) + j * kRow + r];
        uint4* d =
            reinterpret_cast<uint4*>(dst + base + static_cast<int64_t>(t) * p.channels + half * 8);
#pragma unroll
        for (int w = 0; w < kWords; ++w) d[w] = reinterpret_cast<const uint4*>(v)[w];
      }
    } else {
      for (int i = threadIdx.x; i < kC * L; i += kBlock) {
        const int ch = i % kC, r = i / kC, t = t0 + r;
        if (ch < q.nch && t < p.seqlen)
          dst[base + static_cast<int64_t>(t) * p.channels + ch] = tile[row<T>(ch) + r];
      }
    }
  }

  // This thread's kItems steps of its channel in an activation tile, as f32 (16-byte accesses).
  template <typename T>
  static __device__ __forceinline__ void read_items(const T* tile, const Place& q,
                                                    float (&v)[kItems]) {
    alignas(16) T x[kItems];
    constexpr int kWords = kItems * sizeof(T) / 16;
    const uint4* src = reinterpret_cast<const uint4*>(tile + row<T>(q.ch) + q.seg * kItems);
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(x)[w] = src[w];
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = to_float(x[i]);
  }
  template <typename T>
  static __device__ __forceinline__ void write_items(T* tile, const Place& q,
                                                     const float (&v)[kItems]) {
    alignas(16) T x[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) x[i] = from_float<T>(v[i]);
    constexpr int kWords = kItems * sizeof(T) / 16;
    uint4* dst = reinterpret_cast<uint4*>(tile + row<T>(q.ch) + q.seg * kItems);
#pragma unroll
    for (int w = 0; w < kWords; ++w) dst[w] = reinterpret_cast<const uint4*>(x)[w];
  }

  // B/C tiles [2][kNs][kBcRow] f32 for states s0 .. s0 + kNs - 1 of the block's group. Each
  // thread's kItems steps are contiguous, and segments are kItems + 4 floats apart, so that the
  // 16-byte reads of 8 consecutive segments hit 32 different banks and every read of a thread is
  // at a constant offset from one base pointer.
  static constexpr int kSeg = kItems + 4, kBcRow = kTpc * kSeg;
  static __device__ __forceinline__ int bc_pos(int r) {
    return r / kItems * kSeg + r % kItems;
  }
  template <typename T>
  static __device__ __forceinline__ void load_bc(const ScanParams& p, const Place& q, int t0,
                                                 int s0, float* bc) {
    // Thread (matrix k, step r) copies one row of up to kNs states: consecutive threads write
    // consecutive steps (no bank conflicts); the row's global reads share sectors.
    const int64_t stride_t = static_cast<int64_t>(p.groups) * p.d_state;
    const int k = threadIdx.x / 128;
    const int valid = min(kNs, p.d_state - s0);
    const T* src0 = static_cast<const T*>(k == 0 ? p.B : p.C) +
                    static_cast<int64_t>(q.b) * p.seqlen * stride_t +
                    static_cast<int64_t>(q.g) * p.d_state + s0;
#pragma unroll
    for (int r = threadIdx.x % 128; r < L; r += 128) {
      const int t = t0 + r;
      const T* src = src0 + static_cast<int64_t>(t) * stride_t;
      float* dst = bc + k * kNs * kBcRow + bc_pos(r);
      const bool ok = t < p.seqlen;
#pragma unroll
      for (int nn = 0; nn < kNs; ++nn)
        dst[nn * kBcRow] = ok && nn < valid ? to_float(src[nn]) : 0.f;
    }
  }
  // This thread's kItems values in one B/C tile row.
  static __device__ __forceinline__ void read_bc(const float* row, int seg, float (&v)[kItems]) {
    const float* base = row + seg * kSeg;
#pragma unroll
    for (int j = 0; j < kQuads; ++j) {
      const float4 x = *reinterpret_cast<const float4*>(base + 4 * j);
      v[4 * j] = x.x, v[4 * j + 1] = x.y, v[4 * j + 2] = x.z, v[4 * j + 3] = x.w;
    }
  }

  // Document resets: step t starts a new document when seq[t] != seq[t-1].
  static __device__ __forceinline__ void load_seq(const ScanParams& p, const Place& q, int t0,
                                                  int* seq) {
    for (int i = threadIdx.x; i < L + 1; i += kBlock) {
      const int t = t0 - 1 + i;  // seq[0] holds step t0 - 1
      seq[i] = t >= 0 && t < p.seqlen ? p.seq_idx[static_cast<int64_t>(q.b) * p.seqlen + t] : 0;
    }
  }
  static __device__ __forceinline__ bool is_reset(const ScanParams& p, const int* seq, int t0,
                                                  int r) {
    const int t = t0 + r;
    return t > 0 && t < p.seqlen && seq[r + 1] != seq[r];
  }
};

// Both kernels' grid: one block per kC channels of a group, per batch row.
inline dim3 scan_grid(const ScanParams& p) {
  const int per_group = (p.channels / p.groups + kC - 1) / kC;
  return dim3(p.groups * per_group, p.batch);
}

// Calls f(T{}, std::integral_constant<bool, kReset>{}) for the activation type and whether
// document resets are present.
template <typename F>
void dispatch_scan(const ScanParams& p, F&& f) {
  if (p.bf16) {
    if (p.seq_idx)
      f(__nv_bfloat16{}, std::true_type{});
    else
      f(__nv_bfloat16{}, std::false_type{});
  } else {
    if (p.seq_idx)
      f(float{}, std::true_type{});
    else
      f(float{}, std::false_type{});
  }
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
