// Selective scan forward on the GPU. One thread owns one (batch, channel) lane and walks the
// sequence, its N states in registers (fp32). Per step it reads u, delta, z of its channel
// (coalesced across the warp: channels are contiguous) and the B, C rows of its group (the same
// address for every lane of a group: a broadcast). exp(dt A) is one ex2.approx per state.
// Cost per token and channel: N exps, 4N FP32 ops; the MUFU (ex2) throughput bounds it.
#include <cuda_bf16.h>

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
      const float decay = reset ? 0.f : ex2(dt * a2[n]);
      h[n] = decay * h[n] + dtu * load(Bm + tb + n);
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

template <typename T>
void launch(const ScanParams& p, cudaStream_t stream) {
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
