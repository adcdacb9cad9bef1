// Causal conv1d forward and backward on the GPU (work split in causal_conv1d_cuda.h). Memory-
// bound: a block stages its tile's input rows in shared memory by cp.async (all of them in flight
// at once, so the loads' latency is paid once per tile and not once per step), computes in f32
// from there, and writes its outputs back through shared memory as 16-byte vectors. Document
// resets: an input step s contributes to output t only when seq[s] == seq[t] (steps before 0 are
// the initial state and belong to the document of step 0).
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "layers/causal_conv1d/causal_conv1d_cuda.h"
#include "layers/common/cuda_fast_math.cuh"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kThreads = 256;
constexpr int kRowBytes = 128;  // a block's channels span one 128-byte line of a row

// A block's channels (kCh: 64 bf16 or 32 f32), its 16-byte vectors, and the step groups its
// threads form: thread i owns channel i % kCh and the group i / kCh of the tile's steps.
template <typename T>
struct Shape {
  static constexpr int kCh = kRowBytes / sizeof(T);
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kGroups = kThreads / kCh;
};

// This block's batch row, first channel and tile of kConvTile steps (channel blocks fastest).
struct Block {
  int b, c0, tile;
};
template <typename T>
__device__ __forceinline__ Block block_of(const Conv1dParams& p) {
  const int64_t cblocks = (p.channels + Shape<T>::kCh - 1) / Shape<T>::kCh;
  const int64_t tiles = (p.seqlen + kConvTile - 1) / kConvTile, i = blockIdx.x;
  return {static_cast<int>(i / cblocks / tiles), static_cast<int>(i % cblocks) * Shape<T>::kCh,
          static_cast<int>((i / cblocks) % tiles)};
}

// Whether a [B, T, C] tensor's rows start on 16-byte boundaries, so that whole vectors move.
template <typename T>
__device__ __forceinline__ bool vectors_aligned(const Conv1dParams& p, const T* base) {
  return p.channels % Shape<T>::kVec == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Stages steps s0 .. s0 + rows - 1 of the block's channels of a [B, T, C] tensor into shared
// [rows][kCh]: whole vectors by cp.async (zero-filled past the sequence's end), element by
// element at the channels' end or where rows are unaligned; steps before 0 are before(s, c),
// channels past the end 0. The caller commits and waits.
template <typename T, typename Before>
__device__ __forceinline__ void stage_rows(const Conv1dParams& p, const T* src, const Block& k,
                                           int s0, int rows, T* dst, Before before) {
  using S = Shape<T>;
  constexpr int kVecs = S::kCh / S::kVec;
  const bool aligned = vectors_aligned(p, src);
  const int64_t row0 = static_cast<int64_t>(k.b) * p.seqlen;
  for (int i = threadIdx.x; i < rows * kVecs; i += kThreads) {
    const int r = i / kVecs, cv = (i % kVecs) * S::kVec, s = s0 + r, c = k.c0 + cv;
    T* d = dst + r * S::kCh + cv;
    if (s >= 0 && aligned && c < p.channels) {
      const bool in = s < p.seqlen;
      cp_async16(d, in ? src + (row0 + s) * p.channels + c : src, in);
      continue;
    }
#pragma unroll
    for (int e = 0; e < S::kVec; ++e) {
      const int ce = c + e;
      d[e] = ce >= p.channels ? from_float<T>(0.f)
             : s < 0          ? before(s, ce)
             : s < p.seqlen   ? src[(row0 + s) * p.channels + ce]
                              : from_float<T>(0.f);
    }
  }
}

// Writes shared [rows][kCh] to steps s0 .. s0 + rows - 1 of the block's channels of dst.
template <typename T>
__device__ __forceinline__ void store_rows(const Conv1dParams& p, T* dst, const Block& k, int s0,
                                           int rows, const T* src) {
  using S = Shape<T>;
  constexpr int kVecs = S::kCh / S::kVec;
  const bool aligned = vectors_aligned(p, dst);
  const int64_t row0 = static_cast<int64_t>(k.b) * p.seqlen;
  for (int i = threadIdx.x; i < rows * kVecs; i += kThreads) {
    const int r = i / kVecs, cv = (i % kVecs) * S::kVec, c = k.c0 + cv;
    if (c >= p.channels) continue;
    T* g = dst + (row0 + s0 + r) * p.channels + c;
    const T* s = src + r * S::kCh + cv;
    if (aligned) {
      *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(s);
    } else {
      for (int e = 0; e < S::kVec && c + e < p.channels; ++e) g[e] = s[e];
    }
  }
}

// seq of steps s0 .. s0 + rows - 1 into shared (clamped: steps before 0 take step 0's, steps
// past the end the last step's; all 0 without documents).
__device__ __forceinline__ void stage_seq(const Conv1dParams& p, int b, int s0, int rows,
                                          int* dst) {
  const int32_t* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * p.seqlen : nullptr;
  for (int r = threadIdx.x; r < rows; r += kThreads)
    dst[r] = seq ? seq[min(max(s0 + r, 0), p.seqlen - 1)] : 0;
}

// The initial state's element of channel c at step s < 0 (zero without one).
template <typename T, int kW>
__device__ __forceinline__ T initial(const Conv1dParams& p, int b, int s, int c) {
  const T* init = static_cast<const T*>(p.initial_state);
  return init ? init[(static_cast<int64_t>(b) * p.channels + c) * (kW - 1) + (kW - 1 + s)]
              : from_float<T>(0.f);
}

// This thread's channel's taps and bias (zero past the channels' end).
template <typename T, int kW>
__device__ __forceinline__ void load_weights(const Conv1dParams& p, int c, float (&w)[kW],
                                             float& bias) {
  const bool in = c < p.channels;
#pragma unroll
  for (int k = 0; k < kW; ++k) w[k] = in ? to_float(static_cast<const T*>(p.w)[c * kW + k]) : 0.f;
  bias = in && p.bias ? to_float(static_cast<const T*>(p.bias)[c]) : 0.f;
}

// W consecutive rows of one channel in registers, oldest first: values and documents.
template <int kW>
struct Window {
  float v[kW] = {};
  int d[kW] = {};
  __device__ __forceinline__ void push(float x, int doc) {
#pragma unroll
    for (int q = 0; q + 1 < kW; ++q) v[q] = v[q + 1], d[q] = d[q + 1];
    v[kW - 1] = x, d[kW - 1] = doc;
  }
};

// The pre-activation of the output whose inputs are the window: bias plus the taps whose input is
// in the output's (the last row's) document; kDocs false: the block holds one document.
template <int kW, bool kDocs>
__device__ __forceinline__ float pre_activation(const Window<kW>& x, const float (&w)[kW],
                                                float bias) {
  float acc = bias;
#pragma unroll
  for (int q = 0; q < kW; ++q)
    if (!kDocs || x.d[q] == x.d[kW - 1]) acc += w[q] * x.v[q];
  return acc;
}

// Whether the block's staged steps (documents sq[0 .. rows - 1], visible to all threads) span
// more than one document; then the kernels check documents per tap, else they skip the checks.
__device__ __forceinline__ bool block_has_documents(const int* sq, int rows) {
  return __syncthreads_or(static_cast<int>(threadIdx.x) < rows && sq[threadIdx.x] != sq[0]);
}

// Forward: a block computes kConvTile steps of kCh channels from its x rows t0 - W + 1 ..
// t0 + kConvTile - 1; thread (channel, group) walks kConvTile / kGroups consecutive steps,
// keeping its last W inputs in registers.
template <typename T, int kW>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const Conv1dParams p) {
  using S = Shape<T>;
  constexpr int kRows = kConvTile + kW - 1;
  static_assert(kRows <= kThreads);
  __shared__ alignas(16) T xs[kRows * S::kCh];
  __shared__ alignas(16) T ys[kConvTile * S::kCh];
  __shared__ int sq[kRows];
  const Block k = block_of<T>(p);
  const int t0 = k.tile * kConvTile, s0 = t0 - (kW - 1);
  stage_rows(p, static_cast<const T*>(p.x), k, s0, kRows, xs,
             [&](int s, int c) { return initial<T, kW>(p, k.b, s, c); });
  cp_async_commit();
  stage_seq(p, k.b, s0, kRows, sq);
  const int cl = threadIdx.x % S::kCh, g = threadIdx.x / S::kCh, c = k.c0 + cl;
  float w[kW], bias;
  load_weights<T, kW>(p, c, w, bias);
  cp_async_wait();
  __syncthreads();
  auto walk = [&](auto docs) {
    constexpr bool kDocs = decltype(docs)::value;
    constexpr int kPer = kConvTile / S::kGroups;
    const int j0 = g * kPer;  // output t0 + j reads x rows j .. j + W - 1
    Window<kW> x;
#pragma unroll
    for (int q = 0; q + 1 < kW; ++q) x.push(to_float(xs[(j0 + q) * S::kCh + cl]), sq[j0 + q]);
#pragma unroll 4
    for (int j = j0; j < j0 + kPer; ++j) {
      x.push(to_float(xs[(j + kW - 1) * S::kCh + cl]), sq[j + kW - 1]);
      const float acc = pre_activation<kW, kDocs>(x, w, bias);
      ys[j * S::kCh + cl] = from_float<T>(p.silu ? acc * sigmoid(acc) : acc);
    }
  };
  if (block_has_documents(sq, kRows))
    walk(std::true_type{});
  else
    walk(std::false_type{});
  // final_state[j] = input step T - W + 1 + j if it is in the document of step T - 1, else 0.
  const int last = p.seqlen - 1;
  if (p.final_state && g == 0 && c < p.channels && last >= t0 && last < t0 + kConvTile) {
    T* fs =
        static_cast<T*>(p.final_state) + (static_cast<int64_t>(k.b) * p.channels + c) * (kW - 1);
    const int r_last = last - s0;
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) {
      const int r = r_last - (kW - 2) + j;
      fs[j] = sq[r] == sq[r_last] ? xs[r * S::kCh + cl] : from_float<T>(0.f);
    }
  }
  __syncthreads();
  store_rows(p, static_cast<T*>(p.y), k, t0, min(kConvTile, p.seqlen - t0), ys);
}

// Backward: a block stages x for steps t0 - W + 1 .. t0 + kConvTile + W - 2 and dy for the
// outputs t0 .. t0 + kConvTile + W - 2 (the next tile's first W - 1 outputs reach this tile's
// inputs). Phase 1: each thread walks its share of those outputs with its last W inputs in
// registers, forms their pre-activation gradients dp (into shared memory) and sums the dw and
// dbias terms of the tile's own outputs. Phase 2: each thread walks its share of the tile's steps
// (and, in the first tile, the initial state's) with the W gradients that reach each in
// registers, and forms dx; the groups' dw and dbias sums are added in group order into the
// (batch row, tile) partial.
template <typename T, int kW>
__global__ void __launch_bounds__(kThreads) conv_bwd_kernel(const Conv1dParams p) {
  using S = Shape<T>;
  constexpr int kXRows = kConvTile + 2 * (kW - 1), kGRows = kConvTile + kW - 1;
  static_assert(kXRows <= kThreads);
  __shared__ alignas(16) T xs[kXRows * S::kCh];  // x rows; then dx of the tile's steps
  __shared__ alignas(16) T dys[kGRows * S::kCh];
  __shared__ float dps[kGRows * S::kCh];
  __shared__ float sums[S::kGroups * S::kCh * (kW + 1)];
  __shared__ int sq[kXRows];
  const Block k = block_of<T>(p);
  const int t0 = k.tile * kConvTile, t1 = min(p.seqlen, t0 + kConvTile), s0 = t0 - (kW - 1);
  stage_rows(p, static_cast<const T*>(p.x), k, s0, kXRows, xs,
             [&](int s, int c) { return initial<T, kW>(p, k.b, s, c); });
  stage_rows(p, static_cast<const T*>(p.dy), k, t0, kGRows, dys,
             [](int, int) { return from_float<T>(0.f); });
  cp_async_commit();
  stage_seq(p, k.b, s0, kXRows, sq);
  const int cl = threadIdx.x % S::kCh, g = threadIdx.x / S::kCh, c = k.c0 + cl;
  float w[kW], bias;
  load_weights<T, kW>(p, c, w, bias);
  cp_async_wait();
  __syncthreads();
  const int last = p.seqlen - 1;
  const int sq_last = p.seq_idx ? p.seq_idx[static_cast<int64_t>(k.b) * p.seqlen + last] : 0;
  const T* dfs = static_cast<const T*>(p.dfinal_state);
  const int64_t state0 = (static_cast<int64_t>(k.b) * p.channels + c) * (kW - 1);
  auto walk = [&](auto docs) {
    constexpr bool kDocs = decltype(docs)::value;
    // Phase 1: output t0 + j reads x rows j .. j + W - 1; its document is sq[j + W - 1].
    constexpr int kPer1 = (kGRows + S::kGroups - 1) / S::kGroups;
    const int j0 = g * kPer1, j1 = min(j0 + kPer1, kGRows);
    float dw[kW] = {}, db = 0.f;
    Window<kW> x;
#pragma unroll
    for (int q = 0; q + 1 < kW; ++q) x.push(to_float(xs[(j0 + q) * S::kCh + cl]), sq[j0 + q]);
#pragma unroll 2
    for (int j = j0; j < j1; ++j) {
      x.push(to_float(xs[(j + kW - 1) * S::kCh + cl]), sq[j + kW - 1]);
      const int t = t0 + j;
      float gp = 0.f;
      if (t < p.seqlen) {
        gp = to_float(dys[j * S::kCh + cl]);
        if (p.silu) {
          const float acc = pre_activation<kW, kDocs>(x, w, bias), sg = sigmoid(acc);
          gp *= sg * (1.f + acc * (1.f - sg));
        }
      }
      dps[j * S::kCh + cl] = gp;
      if (t < t1) {  // the tile's own output: its dw and dbias terms
        db += gp;
#pragma unroll
        for (int q = 0; q < kW; ++q)
          if (!kDocs || x.d[q] == x.d[kW - 1]) dw[q] += gp * x.v[q];
      }
    }
    float* my = sums + (g * S::kCh + cl) * (kW + 1);
#pragma unroll
    for (int q = 0; q < kW; ++q) my[q] = dw[q];
    my[kW] = db;
    __syncthreads();

    // Phase 2: input step s = t0 + i receives, through tap q, the gradient of output
    // s + W - 1 - q (gradient row i + W - 1 - q; none before step 0). The window holds gradient
    // rows i .. i + W - 1 and their outputs' documents; row i's output has the input's document.
    constexpr int kPer2 = kConvTile / S::kGroups;
    const bool dinit = t0 == 0 && g == 0 && p.dinitial_state;  // steps -(W - 1) .. -1 too
    const int i0 = dinit ? -(kW - 1) : g * kPer2, i1 = min((g + 1) * kPer2, t1 - t0);
    auto grad_row = [&](int m) { return m < 0 ? 0.f : dps[m * S::kCh + cl]; };
    Window<kW> dp;
#pragma unroll
    for (int q = 0; q + 1 < kW; ++q) dp.push(grad_row(i0 + q), sq[i0 + q + kW - 1]);
#pragma unroll 2
    for (int i = i0; i < i1; ++i) {
      dp.push(grad_row(i + kW - 1), sq[i + 2 * (kW - 1)]);
      const int s = t0 + i;
      float dx = 0.f;
#pragma unroll
      for (int q = 0; q < kW; ++q)
        if (!kDocs || dp.d[kW - 1 - q] == dp.d[0]) dx += dp.v[kW - 1 - q] * w[q];
      if (dfs && c < p.channels && s > last - (kW - 1) && sq[i + kW - 1] == sq_last)
        dx += to_float(dfs[state0 + (s - last + kW - 2)]);
      if (s >= 0)
        xs[i * S::kCh + cl] = from_float<T>(dx);
      else if (c < p.channels)
        static_cast<T*>(p.dinitial_state)[state0 + kW - 1 + s] = from_float<T>(dx);
    }
  };
  if (block_has_documents(sq, kXRows))
    walk(std::true_type{});
  else
    walk(std::false_type{});
  if (g == 0 && c < p.channels) {
    const int tiles = (p.seqlen + kConvTile - 1) / kConvTile;
    float* part =
        p.partial + ((static_cast<int64_t>(k.b) * tiles + k.tile) * p.channels + c) * (kW + 1);
    for (int q = 0; q <= kW; ++q) {
      float sum = 0.f;
      for (int h = 0; h < S::kGroups; ++h) sum += sums[(h * S::kCh + cl) * (kW + 1) + q];
      part[q] = sum;
    }
  }
  __syncthreads();
  store_rows(p, static_cast<T*>(p.dx), k, t0, t1 - t0, xs);
}

// dw, dbias += the sums of the (batch row, tile) partials, in order.
template <typename T>
__global__ void conv_bwd_finish(const Conv1dParams p, int parts) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t per = static_cast<int64_t>(p.channels) * (p.width + 1);
  if (i >= per) return;
  float sum = 0.f;
  for (int j = 0; j < parts; ++j) sum += p.partial[j * per + i];
  const int64_t c = i / (p.width + 1), k = i % (p.width + 1);
  T* dst = k < p.width ? static_cast<T*>(p.dw) + c * p.width + k
                       : (p.dbias ? static_cast<T*>(p.dbias) + c : nullptr);
  if (dst) *dst = from_float<T>(to_float(*dst) + sum);
}
// The finishing kernel for dw and dbias of dtype G: T's, or f32 (Conv1dParams::f32_grads).
template <typename T>
void finish(const Conv1dParams& p, int parts, cudaStream_t stream) {
  const int64_t per = static_cast<int64_t>(p.channels) * (p.width + 1);
  const auto blocks = static_cast<unsigned>((per + kThreads - 1) / kThreads);
  if (p.f32_grads)
    conv_bwd_finish<float><<<blocks, kThreads, 0, stream>>>(p, parts);
  else
    conv_bwd_finish<T><<<blocks, kThreads, 0, stream>>>(p, parts);
  CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kW, bool kBackward>
void launch(const Conv1dParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.seqlen + kConvTile - 1) / kConvTile;
  const int64_t blocks = p.batch * tiles * ((p.channels + Shape<T>::kCh - 1) / Shape<T>::kCh);
  if constexpr (!kBackward) {
    conv_fwd_kernel<T, kW><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
  } else {
    conv_bwd_kernel<T, kW><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
    finish<T>(p, static_cast<int>(p.batch * tiles), stream);
  }
}

template <typename T, bool kBackward>
void launch_width(const Conv1dParams& p, cudaStream_t stream) {
  switch (p.width) {
    case 2:
      return launch<T, 2, kBackward>(p, stream);
    case 3:
      return launch<T, 3, kBackward>(p, stream);
    default:
      return launch<T, 4, kBackward>(p, stream);
  }
}

template <bool kBackward>
void dispatch(const Conv1dParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.bf16)
    launch_width<__nv_bfloat16, kBackward>(p, s);
  else
    launch_width<float, kBackward>(p, s);
}

// The halo of row b: its last h inputs in the document of its last token (kAdd false:
// halo[b, c, j] = x[b, T-h+j, c], else 0), or (kAdd) halo[b, c, j] added onto dx[b, T-h+j, c]
// where x's is. One thread per element.
template <typename T, bool kAdd>
__global__ void halo_kernel(const ConvHalo p, T* x, T* halo) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(p.batch) * p.halo * p.channels) return;
  const int64_t c = i % p.channels, j = (i / p.channels) % p.halo, b = i / (p.channels * p.halo);
  const int64_t s = p.seqlen - p.halo + j, row = b * p.seqlen;
  const bool same = !p.seq_idx || p.seq_idx[row + s] == p.seq_idx[row + p.seqlen - 1];
  const int64_t h = (b * p.channels + c) * p.halo + j, at = (row + s) * p.channels + c;
  if (!kAdd)
    halo[h] = same ? x[at] : from_float<T>(0.f);
  else if (same)
    x[at] = from_float<T>(to_float(x[at]) + to_float(halo[h]));
}

template <typename T>
void launch_halo(const ConvHalo& p, bool add, void* x, void* halo, cudaStream_t s) {
  const int64_t n = int64_t(p.batch) * p.halo * p.channels;
  if (n == 0) return;
  const unsigned grid = unsigned((n + 255) / 256);
  if (add)
    halo_kernel<T, true><<<grid, 256, 0, s>>>(p, static_cast<T*>(x), static_cast<T*>(halo));
  else
    halo_kernel<T, false><<<grid, 256, 0, s>>>(p, static_cast<T*>(x), static_cast<T*>(halo));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void causal_conv1d_halo_cuda(const ConvHalo& p, bool add, void* x_or_dx, void* halo, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.bf16)
    launch_halo<__nv_bfloat16>(p, add, x_or_dx, halo, s);
  else
    launch_halo<float>(p, add, x_or_dx, halo, s);
}

void causal_conv1d_fwd_cuda(const Conv1dParams& p, void* stream) {
  dispatch<false>(p, stream);
}
void causal_conv1d_bwd_cuda(const Conv1dParams& p, void* stream) {
  dispatch<true>(p, stream);
}

}  // namespace braid
