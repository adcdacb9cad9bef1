// Selective scan forward on the GPU. One thread owns one (batch, channel) lane and walks the
// sequence, its N states in registers (fp32); exp(dt A) is one ex2.approx per state. Cost per
// token and channel: N exps and ~4N FP32 ops, so the MUFU (ex2) throughput bounds it.
// Simple kernel (any shape): one thread per (batch, channel) lane walks the whole sequence,
// reading global memory step by step. It is latency-bound (one warp per scheduler at typical
// sizes) and serves the shapes the chunked kernel below does not take.
#include <cuda_bf16.h>

#include <algorithm>

#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ float load(const T* p);
template <>
__device__ __forceinline__ float load<float>(const float* p) {
  return __ldg(p);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}
template <typename T>
__device__ __forceinline__ void store(T* p, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, float v) {
  *p = v;
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// kN > 0: the state size is kN (registers); kN == 0: p.d_state <= 256 (local memory).
template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(const ScanParams p) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= p.channels) return;
  constexpr int kMax = kN > 0 ? kN : 256;
  const int n_state = kN > 0 ? kN : p.d_state;
  float h[kMax], a2[kMax];
#pragma unroll
  for (int n = 0; n < kMax; ++n) {
    if (kN == 0 && n >= n_state) break;
    a2[n] = p.A[c * n_state + n] * kLog2e;
    h[n] = p.initial_state
               ? p.initial_state[(static_cast<int64_t>(b) * p.channels + c) * n_state + n]
               : 0.f;
  }
  const int g = c / (p.channels / p.groups);
  const float d_skip = p.D ? p.D[c] : 0.f, bias = p.delta_bias ? p.delta_bias[c] : 0.f;
  const int64_t lane = static_cast<int64_t>(b) * p.u_batch_stride + c;
  const T* u = static_cast<const T*>(p.u) + lane;
  const T* delta = static_cast<const T*>(p.delta) + lane;
  const T* z = p.z ? static_cast<const T*>(p.z) + lane : nullptr;
  T* y = static_cast<T*>(p.y) + lane;
  const int64_t row =
      static_cast<int64_t>(b) * p.bc_batch_stride + static_cast<int64_t>(g) * n_state;
  const T* Bm = static_cast<const T*>(p.B) + row;
  const T* Cm = static_cast<const T*>(p.C) + row;
  const int32_t* seq = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * p.seqlen : nullptr;
  for (int t = 0; t < p.seqlen; ++t) {
    const int64_t ti = t * p.u_time_stride, tb = t * p.bc_time_stride;
    float dt = load(delta + ti) + bias;
    if (p.delta_softplus) dt = dt <= 20.f ? log1pf(__expf(dt)) : dt;
    const float uv = load(u + ti), dtu = dt * uv;
    const bool reset = seq && t > 0 && seq[t] != seq[t - 1];
    float acc = 0.f;
#pragma unroll
    for (int n = 0; n < kMax; ++n) {
      if (kN == 0 && n >= n_state) break;
      // A reset drops the history (a select, not 0 * h: h may be inf when dt < 0).
      h[n] = (reset ? 0.f : ex2(dt * a2[n]) * h[n]) + dtu * load(Bm + tb + n);
      acc += load(Cm + tb + n) * h[n];
    }
    float out = acc + d_skip * uv;
    if (z) {
      const float zv = load(z + ti);
      out *= zv / (1.f + __expf(-zv));
    }
    store(y + ti, out);
  }
  if (p.final_state) {
#pragma unroll
    for (int n = 0; n < kMax; ++n) {
      if (kN == 0 && n >= n_state) break;
      p.final_state[(static_cast<int64_t>(b) * p.channels + c) * n_state + n] = h[n];
    }
  }
}

// Chunked kernel: a block owns kC = 16 channels of one batch row and walks the sequence in chunks
// of kL = 128 steps. In a chunk, the 16 threads of a channel each hold kItems = 8 consecutive
// steps. For each state n: every thread scans its items locally (pairs (a, b) with a = exp(dt A)
// and b = dt u B, combined as (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2)), a 16-lane shuffle scan
// gives each thread the state entering its first item (the state carried from the previous chunk
// enters at lane 0), and the items are replayed to read out y. Still one exp per (step, state);
// the time dimension is now parallel, so the SMs are full. Inputs and outputs pass through
// shared memory as [channel][step] tiles (padded rows), so global reads and writes stay
// coalesced along the channel dimension.
constexpr int kC = 16, kTpc = 16, kItems = 8, kL = kTpc * kItems, kBlock = kC * kTpc;
constexpr int kRow = kL + 2;  // padded tile row (elements)
// B/C tiles are stored [n][r + r / kItems]: the 16 lanes of a channel read steps kItems apart, and
// the extra slot every kItems steps spreads them over 16 banks instead of one.
constexpr int kBcRow = kL + kL / kItems;
__device__ __forceinline__ int bc_col(int r) {
  return r + r / kItems;
}

template <typename T, int kN>
struct ChunkSmem {
  T act[3][kC][kRow];       // u, delta, z; act[0] is reused for y
  float bc[2][kN][kBcRow];  // B and C rows of the block's group, as f32
  float carry[kC][kN];      // state entering the chunk
  float a2[kC][kN];         // A * log2(e) of the block's channels
  int32_t seq[kL];
};

template <typename T>
__device__ __forceinline__ void load8(const T* src, bool ok, float (&v)[8]);
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* src, bool ok,
                                                     float (&v)[8]) {
  uint4 raw = ok ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<float>(const float* src, bool ok, float (&v)[8]) {
  const float4 z = make_float4(0, 0, 0, 0);
  const float4 a = ok ? __ldg(reinterpret_cast<const float4*>(src)) : z;
  const float4 b = ok ? __ldg(reinterpret_cast<const float4*>(src) + 1) : z;
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T, int kN>
__global__ void __launch_bounds__(kBlock, 4) scan_fwd_chunked_kernel(const ScanParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<ChunkSmem<T, kN>*>(smem_raw);
  const int tid = threadIdx.x, ch = tid / kTpc, seg = tid % kTpc;
  const int c0 = blockIdx.x * kC, b = blockIdx.y, c = c0 + ch;
  const int g = c0 / (p.channels / p.groups);
  const int64_t act_base = static_cast<int64_t>(b) * p.u_batch_stride + c0;
  const int64_t bc_base =
      static_cast<int64_t>(b) * p.bc_batch_stride + static_cast<int64_t>(g) * kN;
  const T* srcs[3] = {static_cast<const T*>(p.u), static_cast<const T*>(p.delta),
                      static_cast<const T*>(p.z)};
  for (int i = tid; i < kC * kN; i += kBlock) sm.a2[i / kN][i % kN] = p.A[c0 * kN + i] * kLog2e;
  for (int i = tid; i < kC * kN; i += kBlock)
    sm.carry[i / kN][i % kN] =
        p.initial_state
            ? p.initial_state[(static_cast<int64_t>(b) * p.channels + c0 + i / kN) * kN + i % kN]
            : 0.f;
  const float d_skip = p.D ? p.D[c] : 0.f, bias = p.delta_bias ? p.delta_bias[c] : 0.f;
  const int32_t* seq_g = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * p.seqlen : nullptr;
  const int n_ops = p.z ? 3 : 2;
  for (int t0 = 0; t0 < p.seqlen; t0 += kL) {
    // Stage the chunk: thread (row r, half) reads 8 channels of step t0 + r and transposes them.
    {
      const int r = tid / 2, half = tid % 2, t = t0 + r;
      for (int k = 0; k < n_ops; ++k) {
        float v[8];
        load8<T>(srcs[k] + act_base + static_cast<int64_t>(t) * p.u_time_stride + half * 8,
                 t < p.seqlen, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) sm.act[k][half * 8 + j][r] = from_float<T>(v[j]);
      }
      for (int i = tid; i < 2 * kL * kN; i += kBlock) {
        const int k = i / (kL * kN), rr = (i / kN) % kL, n = i % kN, tt = t0 + rr;
        const T* src = static_cast<const T*>(k == 0 ? p.B : p.C);
        sm.bc[k][n][bc_col(rr)] =
            tt < p.seqlen ? load(src + bc_base + static_cast<int64_t>(tt) * p.bc_time_stride + n)
                          : 0.f;
      }
      if (seq_g && tid < kL) sm.seq[tid] = t0 + tid < p.seqlen ? seq_g[t0 + tid] : 0;
    }
    __syncthreads();
    // This thread's items.
    float dt[kItems], dtu[kItems], out[kItems];
    bool reset[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int r = seg * kItems + i, t = t0 + r;
      const bool valid = t < p.seqlen;
      float d = to_float(sm.act[1][ch][r]) + bias;
      if (p.delta_softplus) d = d <= 20.f ? log1pf(__expf(d)) : d;
      const float uv = to_float(sm.act[0][ch][r]);
      dt[i] = valid ? d : 0.f;  // dt = 0, u = 0 past the end: the identity (a = 1, b = 0)
      dtu[i] = valid ? d * uv : 0.f;
      out[i] = d_skip * uv;
      bool rs = false;
      if (seq_g && valid && t > 0) {
        const int32_t prev = r > 0 ? sm.seq[r - 1] : seq_g[t - 1];
        rs = sm.seq[r] != prev;
      }
      reset[i] = rs;
    }
    const unsigned mask = 0xffffffffu;
    // Not unrolled: per-state values come from shared memory, which keeps registers (and so
    // the number of resident blocks) in check.
#pragma unroll 1
    for (int n = 0; n < kN; ++n) {
      const float a2n = sm.a2[ch][n];
      // Read once, before the shuffles: lane kTpc-1 overwrites it below.
      const float carry_in = sm.carry[ch][n];
      float a[kItems], bb[kItems];
      float A = 1.f, H = 0.f;  // this thread's aggregate over its items
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int r = seg * kItems + i;
        a[i] = reset[i] ? 0.f : ex2(dt[i] * a2n);
        bb[i] = dtu[i] * sm.bc[0][n][bc_col(r)];
        // Selects, not 0 * x: with dt < 0 (no softplus) a state can overflow, and a reset must
        // still drop it.
        H = (reset[i] ? 0.f : a[i] * H) + bb[i];
        A = reset[i] ? 0.f : a[i] * A;
      }
      if (seg == 0) H = (A != 0.f ? A * carry_in : 0.f) + H, A = 0.f;  // carry enters at lane 0
        // Inclusive scan over the 16 lanes of this channel.
#pragma unroll
      for (int off = 1; off < kTpc; off *= 2) {
        const float Ap = __shfl_up_sync(mask, A, off, kTpc),
                    Hp = __shfl_up_sync(mask, H, off, kTpc);
        if (seg >= off) H = (A != 0.f ? A * Hp : 0.f) + H, A = A != 0.f ? A * Ap : 0.f;
      }
      float h = __shfl_up_sync(mask, H, 1, kTpc);  // state entering this thread's first item
      if (seg == 0) h = carry_in;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = (reset[i] ? 0.f : a[i] * h) + bb[i];
        out[i] += sm.bc[1][n][bc_col(seg * kItems + i)] * h;
      }
      if (seg == kTpc - 1) sm.carry[ch][n] = h;
    }
    __syncthreads();  // all reads of act[0] done before it is overwritten with y
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int r = seg * kItems + i;
      float y = out[i];
      if (p.z) {
        const float zv = to_float(sm.act[2][ch][r]);
        y *= zv / (1.f + __expf(-zv));
      }
      sm.act[0][ch][r] = from_float<T>(y);
    }
    __syncthreads();
    {
      const int r = tid / 2, half = tid % 2, t = t0 + r;
      if (t < p.seqlen) {
        alignas(16) T v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = sm.act[0][half * 8 + j][r];
        T* dst =
            static_cast<T*>(p.y) + act_base + static_cast<int64_t>(t) * p.u_time_stride + half * 8;
        constexpr int kWords = 8 * sizeof(T) / 16;  // 16-byte stores: 1 (bf16) or 2 (f32)
#pragma unroll
        for (int w = 0; w < kWords; ++w)
          reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(v)[w];
      }
    }
    __syncthreads();  // the tiles are refilled by the next chunk
  }
  if (p.final_state)
    for (int i = tid; i < kC * kN; i += kBlock)
      p.final_state[(static_cast<int64_t>(b) * p.channels + c0 + i / kN) * kN + i % kN] =
          sm.carry[i / kN][i % kN];
}

// The chunked kernel needs whole blocks of channels inside one group and 16-byte rows.
template <typename T, int kN>
bool launch_chunked(const ScanParams& p, cudaStream_t stream) {
  if (p.channels % kC != 0 || (p.channels / p.groups) % kC != 0) return false;
  const size_t smem = sizeof(ChunkSmem<T, kN>);
  CUDA_CHECK(cudaFuncSetAttribute(scan_fwd_chunked_kernel<T, kN>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  CUDA_CHECK(cudaFuncSetAttribute(scan_fwd_chunked_kernel<T, kN>,
                                  cudaFuncAttributePreferredSharedMemoryCarveout,
                                  cudaSharedmemCarveoutMaxShared));
  const dim3 grid(p.channels / kC, p.batch);
  scan_fwd_chunked_kernel<T, kN><<<grid, kBlock, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  return true;
}

template <typename T>
void launch(const ScanParams& p, cudaStream_t stream) {
  bool done = false;
  switch (p.d_state) {
    case 16:
      done = launch_chunked<T, 16>(p, stream);
      break;
    case 32:
      done = launch_chunked<T, 32>(p, stream);
      break;
    case 64:
      done = launch_chunked<T, 64>(p, stream);
      break;
    default:
      break;
  }
  if (done) return;
  const dim3 grid((p.channels + kThreads - 1) / kThreads, p.batch);
  switch (p.d_state) {
    case 16:
      scan_fwd_kernel<T, 16><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 32:
      scan_fwd_kernel<T, 32><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 64:
      scan_fwd_kernel<T, 64><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      scan_fwd_kernel<T, 0><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void selective_scan_fwd_cuda(const ScanParams& p, void* stream) {
  if (p.bf16)
    launch<__nv_bfloat16>(p, static_cast<cudaStream_t>(stream));
  else
    launch<float>(p, static_cast<cudaStream_t>(stream));
}

}  // namespace braid
