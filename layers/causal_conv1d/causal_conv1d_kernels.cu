// Causal conv1d forward and backward on the GPU (work split in causal_conv1d_cuda.h). Memory-
// bound: each thread loads its rows as 4-byte vectors, keeps them in registers and computes in
// f32. Document resets: an input step s contributes to output t only when seq[s] == seq[t]
// (steps before 0 are the initial state and belong to the document of step 0).
#include <cuda_bf16.h>

#include "layers/causal_conv1d/causal_conv1d_cuda.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kThreads = 256;

template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* src, float (&v)[kVec]) {
  if constexpr (kVec * sizeof(T) == 16) {
    alignas(16) T raw[kVec];
    *reinterpret_cast<uint4*>(raw) = __ldg(reinterpret_cast<const uint4*>(src));
#pragma unroll
    for (int c = 0; c < kVec; ++c) v[c] = to_float(raw[c]);
  } else if constexpr (kVec * sizeof(T) == 8) {
    alignas(8) T raw[kVec];
    *reinterpret_cast<uint2*>(raw) = __ldg(reinterpret_cast<const uint2*>(src));
#pragma unroll
    for (int c = 0; c < kVec; ++c) v[c] = to_float(raw[c]);
  } else if constexpr (kVec * sizeof(T) == 4 && kVec > 1) {
    alignas(4) T raw[kVec];
    *reinterpret_cast<unsigned*>(raw) = __ldg(reinterpret_cast<const unsigned*>(src));
#pragma unroll
    for (int c = 0; c < kVec; ++c) v[c] = to_float(raw[c]);
  } else {
#pragma unroll
    for (int c = 0; c < kVec; ++c) v[c] = to_float(src[c]);
  }
}
template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* dst, const float (&v)[kVec]) {
  if constexpr (kVec * sizeof(T) == 16) {
    alignas(16) T raw[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) raw[c] = from_float<T>(v[c]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(raw);
  } else if constexpr (kVec * sizeof(T) == 8) {
    alignas(8) T raw[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) raw[c] = from_float<T>(v[c]);
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(raw);
  } else if constexpr (kVec * sizeof(T) == 4 && kVec > 1) {
    alignas(4) T raw[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) raw[c] = from_float<T>(v[c]);
    *reinterpret_cast<unsigned*>(dst) = *reinterpret_cast<const unsigned*>(raw);
  } else {
#pragma unroll
    for (int c = 0; c < kVec; ++c) dst[c] = from_float<T>(v[c]);
  }
}
__device__ __forceinline__ float sigmoid(float x) {
  return 1.f / (1.f + expf(-x));
}

// Rows t0 - W + 1 .. t0 - W + 1 + kRows - 1 of this thread's channels: x (the initial state
// before step 0, zero past the end) and their seq values (seq[0] before step 0).
template <typename T, int kVec, int kW, int kRows>
__device__ __forceinline__ void load_rows(const Conv1dParams& p, int b, int c0, int t0,
                                          float (&x)[kRows][kVec], int (&sq)[kRows]) {
  const T* xs = static_cast<const T*>(p.x);
  const T* init = static_cast<const T*>(p.initial_state);
  const int32_t* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * p.seqlen : nullptr;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int s = t0 - (kW - 1) + i;
    if (s >= 0 && s < p.seqlen) {
      load_vec<T, kVec>(xs + (static_cast<int64_t>(b) * p.seqlen + s) * p.channels + c0, x[i]);
    } else {
#pragma unroll
      for (int c = 0; c < kVec; ++c)
        x[i][c] = s < 0 && init
                      ? to_float(init[(static_cast<int64_t>(b) * p.channels + c0 + c) * (kW - 1) +
                                      (kW - 1 + s)])
                      : 0.f;
    }
    sq[i] = seq ? seq[s < 0 ? 0 : (s < p.seqlen ? s : p.seqlen - 1)] : 0;
  }
}

template <typename T, int kVec, int kW>
__device__ __forceinline__ void load_weights(const Conv1dParams& p, int c0, float (&w)[kVec][kW],
                                             float (&bias)[kVec]) {
  const T* ws = static_cast<const T*>(p.w);
  const T* bs = static_cast<const T*>(p.bias);
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
#pragma unroll
    for (int k = 0; k < kW; ++k) w[c][k] = to_float(ws[(c0 + c) * kW + k]);
    bias[c] = bs ? to_float(bs[c0 + c]) : 0.f;
  }
}

// This thread's batch row, first channel and tile of `steps` steps (channel vectors fastest, so
// a warp reads consecutive vectors of one row); false past the end.
struct Cell {
  int b, c0, tile;
};
template <int kVec>
__device__ __forceinline__ bool cell_of(const Conv1dParams& p, int steps, Cell& cell) {
  const int nvec = p.channels / kVec, tiles = (p.seqlen + steps - 1) / steps;
  const int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (v >= static_cast<int64_t>(p.batch) * tiles * nvec) return false;
  cell = {static_cast<int>(v / nvec / tiles), static_cast<int>(v % nvec) * kVec,
          static_cast<int>((v / nvec) % tiles)};
  return true;
}

// Whether a document starts inside steps [lo, hi] of batch row b (clamped to the sequence; steps
// before 0 belong to step 0's document): seq_idx is non-decreasing, so its ends tell. Where none
// does (most tiles), the kernels run a copy of their loop without the per-tap document checks.
__device__ __forceinline__ bool has_boundary(const Conv1dParams& p, int b, int lo, int hi) {
  if (!p.seq_idx) return false;
  const int32_t* seq = p.seq_idx + static_cast<int64_t>(b) * p.seqlen;
  return seq[max(lo, 0)] != seq[min(hi, p.seqlen - 1)];
}

// Same document (kDocs: checked; else known).
template <bool kDocs>
__device__ __forceinline__ bool same_doc(int a, int b) {
  return !kDocs || a == b;
}

// The pre-activation of channel slot c at the output whose window starts at row `row`: bias plus
// the taps whose input is in the output's document.
template <int kVec, int kW, int kRows, bool kDocs>
__device__ __forceinline__ float pre_activation(const float (&x)[kRows][kVec],
                                                const int (&sq)[kRows], const float (&w)[kVec][kW],
                                                float bias, int row, int c) {
  float acc = bias;
#pragma unroll
  for (int k = 0; k < kW; ++k)
    if (same_doc<kDocs>(sq[row + k], sq[row + kW - 1])) acc += w[c][k] * x[row + k][c];
  return acc;
}

template <typename T, int kVec, int kW, bool kDocs>
__device__ __forceinline__ void conv_fwd_body(const Conv1dParams& p, const Cell& cell) {
  const int b = cell.b, c0 = cell.c0, t0 = cell.tile * kConvSteps;
  constexpr int kRows = kConvSteps + kW - 1;
  float x[kRows][kVec], w[kVec][kW], bias[kVec];
  int sq[kRows];
  load_rows<T, kVec, kW, kRows>(p, b, c0, t0, x, sq);
  load_weights<T, kVec, kW>(p, c0, w, bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int j = 0; j < kConvSteps; ++j) {
    const int t = t0 + j;
    if (t >= p.seqlen) break;
    float out[kVec];
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      const float acc = pre_activation<kVec, kW, kRows, kDocs>(x, sq, w, bias[c], j, c);
      out[c] = p.silu ? acc * sigmoid(acc) : acc;
    }
    store_vec<T, kVec>(y + (static_cast<int64_t>(b) * p.seqlen + t) * p.channels + c0, out);
  }
  // final_state[j] = input step T - W + 1 + j if it is in the document of step T - 1, else 0.
  const int last = p.seqlen - 1;
  if (p.final_state && last >= t0 && last < t0 + kConvSteps) {
    T* fs = static_cast<T*>(p.final_state);
    const int i_last = last - t0 + kW - 1;
#pragma unroll
    for (int jj = 0; jj < kW - 1; ++jj) {
      const int i = i_last - (kW - 2) + jj;  // row of step T - W + 1 + jj
#pragma unroll
      for (int ii = 0; ii < kRows; ++ii) {
        if (ii != i) continue;
#pragma unroll
        for (int c = 0; c < kVec; ++c)
          fs[(static_cast<int64_t>(b) * p.channels + c0 + c) * (kW - 1) + jj] =
              from_float<T>(same_doc<kDocs>(sq[ii], sq[i_last]) ? x[ii][c] : 0.f);
      }
    }
  }
}

template <typename T, int kVec, int kW>
__global__ void __launch_bounds__(kThreads, 4) conv_fwd_kernel(const Conv1dParams p) {
  Cell cell;
  if (!cell_of<kVec>(p, kConvSteps, cell)) return;
  const int t0 = cell.tile * kConvSteps;
  if (has_boundary(p, cell.b, t0 - (kW - 1), t0 + kConvSteps - 1))
    conv_fwd_body<T, kVec, kW, true>(p, cell);
  else
    conv_fwd_body<T, kVec, kW, false>(p, cell);
}

// The backward walks its tile's outputs t = t0 .. t1 + W - 2 once, keeping the last W input rows
// (x, document) and the last W pre-activation gradients in registers (ring slots fixed at compile
// time by the unrolled loop): at output t it loads x[t] and dy[t], forms dpre[t] (adding its dw
// and dbias terms when t is the tile's own), and then finishes dx[t - W + 1] (or, in the first
// tile, the initial state's gradient) from the W gradients that reach it.
template <typename T, int kVec, int kW, bool kDocs>
__device__ __forceinline__ void conv_bwd_body(const Conv1dParams& p, const Cell& cell) {
  const int b = cell.b, c0 = cell.c0, tile = cell.tile;
  const int tiles = (p.seqlen + kConvTile - 1) / kConvTile;
  const int t0 = tile * kConvTile, t1 = min(p.seqlen, t0 + kConvTile);
  float w[kVec][kW], bias[kVec], dw[kVec][kW] = {}, db[kVec] = {};
  load_weights<T, kVec, kW>(p, c0, w, bias);
  const T* xs = static_cast<const T*>(p.x);
  const T* init = static_cast<const T*>(p.initial_state);
  const T* dys = static_cast<const T*>(p.dy);
  const T* dfs = static_cast<const T*>(p.dfinal_state);
  T* dxs = static_cast<T*>(p.dx);
  const int32_t* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * p.seqlen : nullptr;
  const int last = p.seqlen - 1;
  const int sq_last = seq ? seq[last] : 0;
  const int64_t row0 = static_cast<int64_t>(b) * p.seqlen;
  // Ring slot of input row / output t: (t - t0 + kW - 1) % kW (compile-time in the loop below).
  float x[kW][kVec], dp[kW][kVec];
  int sq[kW];
  auto load_x = [&](int s, float(&v)[kVec], int& d) {
    if (s >= 0 && s < p.seqlen) {
      load_vec<T, kVec>(xs + (row0 + s) * p.channels + c0, v);
    } else {
#pragma unroll
      for (int c = 0; c < kVec; ++c)
        v[c] = s < 0 && init
                   ? to_float(init[(static_cast<int64_t>(b) * p.channels + c0 + c) * (kW - 1) +
                                   (kW - 1 + s)])
                   : 0.f;
    }
    d = seq ? seq[s < 0 ? 0 : (s < p.seqlen ? s : last)] : 0;
  };
#pragma unroll
  for (int i = 0; i < kW - 1; ++i) {  // rows t0 - W + 1 .. t0 - 1
    load_x(t0 - (kW - 1) + i, x[i], sq[i]);
#pragma unroll
    for (int c = 0; c < kVec; ++c) dp[i][c] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < kConvTile + kW - 1; ++j) {
    const int t = t0 + j;
    if (t > t1 + kW - 2) break;
    constexpr int kSlots = kW;
    const int cur = (j + kW - 1) % kSlots;  // slot of row / output t
    load_x(t, x[cur], sq[cur]);
    float g[kVec];
    if (t < p.seqlen) load_vec<T, kVec>(dys + (row0 + t) * p.channels + c0, g);
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      float gp = 0.f;
      if (t < p.seqlen) {
        gp = g[c];
        if (p.silu) {
          float acc = bias[c];
#pragma unroll
          for (int k = 0; k < kW; ++k) {
            const int slot = (j + k) % kSlots;  // row t - W + 1 + k
            if (same_doc<kDocs>(sq[slot], sq[cur])) acc += w[c][k] * x[slot][c];
          }
          const float sg = sigmoid(acc);
          gp *= sg * (1.f + acc * (1.f - sg));
        }
      }
      dp[cur][c] = gp;
      if (t < t1) {  // the tile's own output: its dw and dbias terms
        db[c] += gp;
#pragma unroll
        for (int k = 0; k < kW; ++k) {
          const int slot = (j + k) % kSlots;
          if (same_doc<kDocs>(sq[slot], sq[cur])) dw[c][k] += gp * x[slot][c];
        }
      }
    }
    // Input step s = t - W + 1 (slot of row s: (j % kW)) now has every output gradient.
    const int s = t - (kW - 1), is = j % kSlots;
    if (s >= t1 || (s < t0 && !(s < 0 && p.dinitial_state))) continue;
    float dx[kVec] = {};
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const int o = s + kW - 1 - k, slot = (j + kW - 1 - k) % kSlots;  // output o's slot
      if (o >= 0 && o < p.seqlen && same_doc<kDocs>(sq[is], sq[slot]))
#pragma unroll
        for (int c = 0; c < kVec; ++c) dx[c] += dp[slot][c] * w[c][k];
    }
    if (dfs && s > last - (kW - 1) && same_doc<kDocs>(sq[is], sq_last))
#pragma unroll
      for (int c = 0; c < kVec; ++c)
        dx[c] += to_float(
            dfs[(static_cast<int64_t>(b) * p.channels + c0 + c) * (kW - 1) + (s - last + kW - 2)]);
    if (s >= 0) {
      store_vec<T, kVec>(dxs + (row0 + s) * p.channels + c0, dx);
    } else {
      T* di = static_cast<T*>(p.dinitial_state);
#pragma unroll
      for (int c = 0; c < kVec; ++c)
        di[(static_cast<int64_t>(b) * p.channels + c0 + c) * (kW - 1) + kW - 1 + s] =
            from_float<T>(dx[c]);
    }
  }
  float* part = p.partial + (static_cast<int64_t>(b) * tiles + tile) * p.channels * (kW + 1);
#pragma unroll
  for (int c = 0; c < kVec; ++c) {
#pragma unroll
    for (int k = 0; k < kW; ++k) part[(c0 + c) * (kW + 1) + k] = dw[c][k];
    part[(c0 + c) * (kW + 1) + kW] = db[c];
  }
}

template <typename T, int kVec, int kW>
__global__ void __launch_bounds__(kThreads, 3) conv_bwd_kernel(const Conv1dParams p) {
  Cell cell;
  if (!cell_of<kVec>(p, kConvTile, cell)) return;
  const int t0 = cell.tile * kConvTile, t1 = min(p.seqlen, t0 + kConvTile);
  if (has_boundary(p, cell.b, t0 - (kW - 1), t1 + kW - 2))
    conv_bwd_body<T, kVec, kW, true>(p, cell);
  else
    conv_bwd_body<T, kVec, kW, false>(p, cell);
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

template <typename T, int kVec, int kW, bool kBackward>
void launch(const Conv1dParams& p, cudaStream_t stream) {
  const int64_t nvec = p.channels / kVec;
  if constexpr (!kBackward) {
    const int64_t n = p.batch * ((p.seqlen + kConvSteps - 1) / kConvSteps) * nvec;
    conv_fwd_kernel<T, kVec, kW>
        <<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
  } else {
    const int64_t tiles = (p.seqlen + kConvTile - 1) / kConvTile, n = p.batch * tiles * nvec;
    conv_bwd_kernel<T, kVec, kW>
        <<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
    finish<T>(p, static_cast<int>(p.batch * tiles), stream);
  }
}

template <typename T, int kVec, bool kBackward>
void launch_width(const Conv1dParams& p, cudaStream_t stream) {
  switch (p.width) {
    case 2:
      return launch<T, kVec, 2, kBackward>(p, stream);
    case 3:
      return launch<T, kVec, 3, kBackward>(p, stream);
    default:
      return launch<T, kVec, 4, kBackward>(p, stream);
  }
}

// Vectors of 4 bytes when every row starts aligned to them, single channels otherwise: few enough
// registers for 32 (forward) or 24 (backward) warps per SM, which a memory-bound kernel needs to
// keep loads in flight (with 8-byte vectors the forward held 100 registers and 16 warps, and ran
// at 21% of the memory bandwidth on an H100).
template <typename T, bool kBackward>
void launch_type(const Conv1dParams& p, cudaStream_t stream) {
  constexpr int kVec = 4 / sizeof(T);
  if (p.channels % kVec == 0)
    launch_width<T, kVec, kBackward>(p, stream);
  else
    launch_width<T, 1, kBackward>(p, stream);
}

template <bool kBackward>
void dispatch(const Conv1dParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.bf16)
    launch_type<__nv_bfloat16, kBackward>(p, s);
  else
    launch_type<float, kBackward>(p, s);
}

}  // namespace

void causal_conv1d_fwd_cuda(const Conv1dParams& p, void* stream) {
  dispatch<false>(p, stream);
}
void causal_conv1d_bwd_cuda(const Conv1dParams& p, void* stream) {
  dispatch<true>(p, stream);
}

}  // namespace braid
