// Selective scan forward on the GPU. One thread owns one (batch, channel) lane and walks the
// sequence, its N states in registers (fp32); exp(dt A) is one ex2.approx per state. Cost per
// token and channel: N exps and ~4N FP32 ops, so the MUFU (ex2) throughput bounds it.
// Staged kernel (rows 16-byte aligned): a block of 128 channels copies chunks of kChunk steps of
// u, delta, z, the B/C rows of the groups it spans, and seq_idx into shared memory with cp.async,
// double-buffered, so the DRAM latency of chunk k+1 hides behind the compute of chunk k.
// Simple kernel (any alignment): the same recurrence reading global memory step by step.
#include <cuda_bf16.h>

#include <algorithm>

#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/cuda_check.h"

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
__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
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

constexpr int kChunk = 32;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0 source bytes: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Shared memory of one stage: act [3][kChunk][kThreads] (u, delta, z), bc [2][kChunk][span*N]
// (B, C rows of the `span` groups the block covers), seq [kChunk] (i32).
template <typename T>
struct Stage {
  __host__ __device__ static size_t bytes(int span, int n) {
    const size_t a = (3 * kChunk * kThreads + 2 * kChunk * span * n) * sizeof(T);
    return (a + 15) / 16 * 16 + kChunk * sizeof(int32_t);
  }
};

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) scan_fwd_staged_kernel(const ScanParams p, int span) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int c0 = blockIdx.x * kThreads, c = c0 + threadIdx.x, b = blockIdx.y;
  const int cpg = p.channels / p.groups, g_lo = c0 / cpg;
  const int row_elems = span * kN;  // B/C elements per step staged for this block
  const size_t stage_bytes = Stage<T>::bytes(span, kN);
  auto act = [&](int buf, int k) {
    return reinterpret_cast<T*>(smem + buf * stage_bytes) + k * kChunk * kThreads;
  };
  auto bc = [&](int buf, int k) {
    return reinterpret_cast<T*>(smem + buf * stage_bytes) + 3 * kChunk * kThreads +
           k * kChunk * row_elems;
  };
  auto seqs = [&](int buf) {
    return reinterpret_cast<int32_t*>(smem + buf * stage_bytes + stage_bytes -
                                      kChunk * sizeof(int32_t));
  };
  const int64_t act_base = static_cast<int64_t>(b) * p.u_batch_stride + c0;
  const int64_t bc_base =
      static_cast<int64_t>(b) * p.bc_batch_stride + static_cast<int64_t>(g_lo) * kN;
  const int bc_valid = min(span, p.groups - g_lo) * kN;  // staged elements that exist
  const T* srcs[3] = {static_cast<const T*>(p.u), static_cast<const T*>(p.delta),
                      static_cast<const T*>(p.z ? p.z : p.u)};
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte copy
  auto load_chunk = [&](int buf, int t0) {
    // Activations: kChunk rows of kThreads channels each, in 16-byte pieces.
    constexpr int kPieces = kChunk * kThreads / kVec;
    for (int i = threadIdx.x; i < 3 * kPieces; i += kThreads) {
      const int k = i / kPieces, r = (i % kPieces) / (kThreads / kVec),
                col = (i % (kThreads / kVec)) * kVec;
      const int t = t0 + r;
      const bool ok = t < p.seqlen && c0 + col < p.channels && (k < 2 || p.z);
      const T* src = srcs[k] + (ok ? act_base + t * p.u_time_stride + col : 0);
      cp_async16(act(buf, k) + r * kThreads + col, src, ok);
    }
    const int bc_pieces = row_elems / kVec;
    for (int i = threadIdx.x; i < 2 * kChunk * bc_pieces; i += kThreads) {
      const int k = i / (kChunk * bc_pieces), r = (i / bc_pieces) % kChunk,
                col = (i % bc_pieces) * kVec;
      const int t = t0 + r;
      const bool ok = t < p.seqlen && col < bc_valid;
      const T* src = static_cast<const T*>(k == 0 ? p.B : p.C) +
                     (ok ? bc_base + t * p.bc_time_stride + col : 0);
      cp_async16(bc(buf, k) + r * row_elems + col, src, ok);
    }
    if (p.seq_idx && threadIdx.x < kChunk) {
      const int t = t0 + threadIdx.x;
      const bool ok = t < p.seqlen;
      cp_async4(seqs(buf) + threadIdx.x,
                p.seq_idx + static_cast<int64_t>(b) * p.seqlen + (ok ? t : 0), ok);
    }
    cp_async_commit();
  };

  const bool active = c < p.channels;
  const int cc = active ? c : c0;  // inactive lanes compute on a valid channel and store nothing
  float h[kN], a2[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    a2[n] = p.A[cc * kN + n] * kLog2e;
    h[n] = p.initial_state && active
               ? p.initial_state[(static_cast<int64_t>(b) * p.channels + cc) * kN + n]
               : 0.f;
  }
  const int gl = cc / cpg - g_lo;  // this lane's group among the staged ones
  const float d_skip = p.D ? p.D[cc] : 0.f, bias = p.delta_bias ? p.delta_bias[cc] : 0.f;
  T* y = static_cast<T*>(p.y) + static_cast<int64_t>(b) * p.u_batch_stride + c;
  int prev_doc = 0;
  const int n_chunks = (p.seqlen + kChunk - 1) / kChunk;
  load_chunk(0, 0);
  for (int k = 0; k < n_chunks; ++k) {
    const int buf = k & 1;
    if (k + 1 < n_chunks) {
      load_chunk(buf ^ 1, (k + 1) * kChunk);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T *su = act(buf, 0), *sd = act(buf, 1), *sz = act(buf, 2);
    const T *sb = bc(buf, 0) + gl * kN, *sc = bc(buf, 1) + gl * kN;
    const int32_t* sq = seqs(buf);
    const int steps = min(kChunk, p.seqlen - k * kChunk);
    for (int r = 0; r < steps; ++r) {
      const int t = k * kChunk + r;
      float dt = to_float(sd[r * kThreads + threadIdx.x]) + bias;
      if (p.delta_softplus) dt = dt <= 20.f ? log1pf(__expf(dt)) : dt;
      const float uv = to_float(su[r * kThreads + threadIdx.x]), dtu = dt * uv;
      bool reset = false;
      if (p.seq_idx) {
        reset = t > 0 && sq[r] != prev_doc;
        prev_doc = sq[r];
      }
      const T* br = sb + r * row_elems;
      const T* cr = sc + r * row_elems;
      float acc = 0.f;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        h[n] = (reset ? 0.f : ex2(dt * a2[n]) * h[n]) + dtu * to_float(br[n]);
        acc += to_float(cr[n]) * h[n];
      }
      float out = acc + d_skip * uv;
      if (p.z) {
        const float zv = to_float(sz[r * kThreads + threadIdx.x]);
        out *= zv / (1.f + __expf(-zv));
      }
      if (active) store(y + t * p.u_time_stride, out);
    }
    __syncthreads();  // the buffer is refilled by the next iteration's prefetch
  }
  if (p.final_state && active) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      p.final_state[(static_cast<int64_t>(b) * p.channels + c) * kN + n] = h[n];
  }
}

// Launches the staged kernel when rows are 16-byte aligned and the stage fits; returns false
// otherwise (the caller uses the simple kernel).
template <typename T, int kN>
bool launch_staged(const ScanParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int cpg = p.channels / p.groups;
  if (p.channels % kVec != 0 || kN % kVec != 0) return false;
  const int span = std::min(p.groups, (kThreads + cpg - 1) / cpg + 1);
  const size_t smem = 2 * Stage<T>::bytes(span, kN);
  if (smem > 160 * 1024) return false;
  CUDA_CHECK(cudaFuncSetAttribute(scan_fwd_staged_kernel<T, kN>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  const dim3 grid((p.channels + kThreads - 1) / kThreads, p.batch);
  scan_fwd_staged_kernel<T, kN><<<grid, kThreads, smem, stream>>>(p, span);
  CUDA_CHECK(cudaGetLastError());
  return true;
}

template <typename T>
void launch(const ScanParams& p, cudaStream_t stream) {
  bool done = false;
  switch (p.d_state) {
    case 16:
      done = launch_staged<T, 16>(p, stream);
      break;
    case 32:
      done = launch_staged<T, 32>(p, stream);
      break;
    case 64:
      done = launch_staged<T, 64>(p, stream);
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
