// Shared pieces of the selective scan kernels (CUDA sources only): the block's place in the
// problem, staging of [channel][step] activation tiles and [state][step] B/C tiles through
// shared memory, and the fast exp2.
//
// Thread layout (both kernels): a block of kBlock = 256 threads owns kC = 16 channels of one
// group and one batch row; thread tid works on channel ch = tid / 16 and on the kItems = L / 16
// consecutive steps seg * kItems .. (seg + 1) * kItems - 1 (seg = tid % 16) of each L-step chunk
// (L = 128 or 256). The 16 threads of a channel are 16 lanes of one warp, so scans over the chunk
// are warp shuffles.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/cuda_convert.cuh"

namespace braid::scan {

constexpr int kC = kScanChannels, kTpc = 16, kBlock = kC * kTpc;
constexpr int kNs = 16;  // states per B/C tile (a slice of N)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLog2eLo = 1.925963033e-8f;  // log2(e) - kLog2e
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kBlock == 256, "the staging below assumes 256 threads");

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
// Fast division: 2 ulp, against a full-precision reciprocal's dozen instructions.
__device__ __forceinline__ float sigmoid(float x) {
  return __fdividef(1.f, 1.f + __expf(-x));
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
  static constexpr int kQuads = kItems / 4;
  static_assert(L % 128 == 0 && kItems % 4 == 0, "chunks of 128 or 256 steps");

  // Transposition cells for shared-to-shared copies: the L x 2 (step, half of the 16 channels)
  // pieces of a chunk, kCells per thread. In every warp the lanes of half 0 and of half 1 hold
  // steps 16 apart, so their accesses to a [channel][step] tile fall in different banks. (Global
  // accesses keep the step = tid / 2, half = tid % 2 mapping: each warp reads whole sectors.)
  static constexpr int kCells = L / 128;
  static __device__ __forceinline__ int cell_step(int it) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    return 128 * it + 32 * (w / 2) + (l % 16) + 16 * ((l / 16) ^ (w % 2));
  }
  static __device__ __forceinline__ int cell_half() { return (threadIdx.x % 32) / 16; }

  // Activation tile [kC][kRow] (steps t0 .. t0 + L - 1), zero outside the problem.
  template <typename T>
  static __device__ __forceinline__ void load(const ScanParams& p, const Place& q, const T* src,
                                              int t0, T* tile) {
    const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
    if (q.vec) {
      // Thread (step r, half): 8 channels in one or two 16-byte loads, transposed into the tile.
      // The two halves write rows 2 apart at each store: different banks.
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
        for (int j = 0; j < 8; ++j) {
          const int jj = half ? (j + 2) & 7 : j;
          tile[(half * 8 + jj) * kRow + r] = half ? v[(j + 2) & 7] : v[j];
        }
      }
    } else {
      for (int i = threadIdx.x; i < kC * L; i += kBlock) {
        const int ch = i % kC, r = i / kC, t = t0 + r;
        tile[ch * kRow + r] = ch < q.nch && t < p.seqlen
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
        for (int j = 0; j < 8; ++j) {
          const int jj = half ? (j + 2) & 7 : j;
          const T x = tile[(half * 8 + jj) * kRow + r];
          if (half)
            v[(j + 2) & 7] = x;
          else
            v[j] = x;
        }
        uint4* d =
            reinterpret_cast<uint4*>(dst + base + static_cast<int64_t>(t) * p.channels + half * 8);
#pragma unroll
        for (int w = 0; w < kWords; ++w) d[w] = reinterpret_cast<const uint4*>(v)[w];
      }
    } else {
      for (int i = threadIdx.x; i < kC * L; i += kBlock) {
        const int ch = i % kC, r = i / kC, t = t0 + r;
        if (ch < q.nch && t < p.seqlen)
          dst[base + static_cast<int64_t>(t) * p.channels + ch] = tile[ch * kRow + r];
      }
    }
  }

  // This thread's kItems steps of its channel in an activation tile, as f32 (16-byte accesses).
  template <typename T>
  static __device__ __forceinline__ void read_items(const T* tile, const Place& q,
                                                    float (&v)[kItems]) {
    alignas(16) T x[kItems];
    constexpr int kWords = kItems * sizeof(T) / 16;
    const uint4* src = reinterpret_cast<const uint4*>(tile + q.ch * kRow + q.seg * kItems);
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
    uint4* dst = reinterpret_cast<uint4*>(tile + q.ch * kRow + q.seg * kItems);
#pragma unroll
    for (int w = 0; w < kWords; ++w) dst[w] = reinterpret_cast<const uint4*>(x)[w];
  }

  // B/C tiles [2][kNs][L] f32 for states s0 .. s0 + kNs - 1 of the block's group. Each thread's
  // kItems steps are kQuads float4s, rotated per segment so that the 16-byte reads of 8
  // consecutive segments hit 32 different banks.
  static __device__ __forceinline__ int quad_rot(int seg) {
    return (seg / (8 / kQuads)) % kQuads;
  }
  static __device__ __forceinline__ int bc_pos(int r) {
    const int s = r / kItems, i = r % kItems;
    return s * kItems + 4 * ((i / 4) ^ quad_rot(s)) + i % 4;
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
      float* dst = bc + k * kNs * L + bc_pos(r);
      const bool ok = t < p.seqlen;
#pragma unroll
      for (int nn = 0; nn < kNs; ++nn) dst[nn * L] = ok && nn < valid ? to_float(src[nn]) : 0.f;
    }
  }
  // This thread's kItems values in one B/C tile row.
  static __device__ __forceinline__ void read_bc(const float* row, int seg, float (&v)[kItems]) {
    const float* base = row + seg * kItems;
    const int rot = quad_rot(seg);
#pragma unroll
    for (int j = 0; j < kQuads; ++j) {
      const float4 x = *reinterpret_cast<const float4*>(base + 4 * (j ^ rot));
      v[4 * j] = x.x, v[4 * j + 1] = x.y, v[4 * j + 2] = x.z, v[4 * j + 3] = x.w;
    }
  }

  // Asynchronous staging (the forward's fast path: whole channel blocks, N <= kNs and B/C rows
  // of 16-byte multiples): prefetch() copies the rows of a chunk raw, [step][16 channels] and
  // [step][kNs states], into a staging buffer with cp.async while the previous chunk computes;
  // from_raw() then transposes them into the tiles (shared to shared, no global latency).
  static constexpr int kRawAct = 3 * L * kC, kRawBc = 2 * L * kNs;  // elements
  // Where 8 channels (half) of step r sit in a raw activation buffer: the halves swap places
  // every 4 steps, so the 16-byte reads of 8 consecutive steps hit 32 different banks.
  template <typename T>
  static __device__ __forceinline__ int raw_pos(int r, int half) {
    return r * kC + (half ^ ((r >> 2) & 1)) * 8;
  }
  template <typename T>
  static __device__ __forceinline__ bool can_prefetch(const ScanParams& p, const Place& q) {
    return q.vec && p.d_state <= kNs && (p.d_state * sizeof(T)) % 16 == 0;
  }
  template <typename T>
  static __device__ __forceinline__ void prefetch(const ScanParams& p, const Place& q, int t0,
                                                  T* raw) {
    const T* srcs[3] = {static_cast<const T*>(p.u), static_cast<const T*>(p.delta),
                        static_cast<const T*>(p.z)};
    const int64_t base = static_cast<int64_t>(q.b) * p.seqlen * p.channels + q.c0;
    static_assert(sizeof(T) == 2, "the asynchronous staging is for 16-bit activations");
    constexpr int kPer = 8;  // elements per 16-byte copy
    for (int k = 0; k < (p.z ? 3 : 2); ++k)
      for (int i = threadIdx.x; i < L * kC / kPer; i += kBlock) {
        const int r = i / (kC / kPer), part = i % (kC / kPer), t = t0 + r;
        const bool ok = t < p.seqlen;
        copy16(raw + k * L * kC + raw_pos<T>(r, part),
               srcs[k] + base + static_cast<int64_t>(ok ? t : 0) * p.channels + part * kPer, ok);
      }
    const int64_t stride_t = static_cast<int64_t>(p.groups) * p.d_state;
    const int per_row = p.d_state / kPer;
    for (int k = 0; k < 2; ++k) {
      const T* src = static_cast<const T*>(k == 0 ? p.B : p.C) +
                     static_cast<int64_t>(q.b) * p.seqlen * stride_t +
                     static_cast<int64_t>(q.g) * p.d_state;
      for (int i = threadIdx.x; i < L * per_row; i += kBlock) {
        const int r = i / per_row, part = i % per_row, t = t0 + r;
        const bool ok = t < p.seqlen;
        copy16(raw + kRawAct + (k * L + r) * kNs + part * kPer,
               src + static_cast<int64_t>(ok ? t : 0) * stride_t + part * kPer, ok);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  template <typename T>
  static __device__ __forceinline__ void from_raw(const ScanParams& p, const T* raw, T* act,
                                                  float* bc) {
    static_assert(sizeof(T) == 2, "the asynchronous staging is for 16-bit activations");
    const int half = cell_half();
    for (int k = 0; k < (p.z ? 3 : 2); ++k)
#pragma unroll
      for (int it = 0; it < kCells; ++it) {
        const int r = cell_step(it);
        alignas(16) T v[8];
        *reinterpret_cast<uint4*>(v) =
            *reinterpret_cast<const uint4*>(raw + k * L * kC + raw_pos<T>(r, half));
        T* tile = act + k * kC * kRow;
#pragma unroll
        for (int j = 0; j < 8; ++j) tile[(half * 8 + j) * kRow + r] = v[j];
      }
    // B/C rows: kNs raw values in 16-byte reads (states past N hold stale values; zero them).
    const int k = threadIdx.x / 128;
#pragma unroll
    for (int r = threadIdx.x % 128; r < L; r += 128) {
      alignas(16) T v[kNs];
      const uint4* src = reinterpret_cast<const uint4*>(raw + kRawAct + (k * L + r) * kNs);
#pragma unroll
      for (int w = 0; w < static_cast<int>(kNs * sizeof(T) / 16); ++w)
        reinterpret_cast<uint4*>(v)[w] = src[w];
      float* dst = bc + k * kNs * L + bc_pos(r);
#pragma unroll
      for (int nn = 0; nn < kNs; ++nn) dst[nn * L] = nn < p.d_state ? to_float(v[nn]) : 0.f;
    }
  }
  static __device__ __forceinline__ void copy16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(valid ? 16 : 0));
  }
  static __device__ __forceinline__ void wait_prefetch() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
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
