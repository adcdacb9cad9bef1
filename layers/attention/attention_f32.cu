// Attention in f32 on the GPU: the f32 runs of the training path (train.precision = fp32, the
// GPU-vs-CPU check), not the fast path (bf16 tensor-core kernels, attention_fwd.cu and
// attention_bwd.cu). The math of attention.h, one warp per row, in the reference's order of
// operations where it matters (a key at a time, online softmax in f32, expf):
//   forward, a warp per (b, h, query t): keys s from the start of t's document to t, each
//     s_ts = scale q_t . k_s (a lane holds P/32 elements, the dot product a warp sum), then
//     m' = max(m, s_ts), l' = l e^(m - m') + e^(s_ts - m'), o' = o e^(m - m') + e^(s_ts - m') v_s;
//     o_t = o / l, lse_t = m + log l.
//   backward 1, a warp per (b, h, query t): D_t = do_t . o_t (kept in the workspace), and
//     dq_t = scale sum_s p_ts (do_t . v_s - D_t) k_s.
//   backward 2, a warp per (b, KV head, key s): dk_s and dv_s summed over the query heads of the
//     group, then over the queries t >= s of s's document, in that order (deterministic).
// Documents are contiguous runs of seq_idx (non-decreasing): a query's first key and a key's
// last query are found by binary search (attention_tiles.cuh). Rows outside p.rows keep o and lse,
// get dq = 0 and add nothing to dk, dv. Workspace: D, f32 [B,H,T] (the bf16 path's workspace is
// larger, so either size serves).
#include <cuda_runtime.h>

#include "layers/attention/attention_cuda.h"
#include "layers/attention/attention_tiles.cuh"
#include "layers/common/cuda_fast_math.cuh"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

constexpr int kWarpsF32 = 8;  // warps per block

// The document bounds of position t in row b (attention_tiles.cuh).
__device__ const int32_t* seq_row(const AttnParams& p, int b) {
  return p.seq_idx ? p.seq_idx + int64_t(b) * p.seqlen : nullptr;
}

template <int L>  // elements per lane: P / 32
struct Row {
  float v[L];
  __device__ void load(const float* src, int lane) {
#pragma unroll
    for (int i = 0; i < L; ++i) v[i] = src[lane + 32 * i];
  }
  __device__ float dot(const Row& o) const {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < L; ++i) acc += v[i] * o.v[i];
    return warp_sum(acc);
  }
};

template <int L>
__global__ __launch_bounds__(32 * kWarpsF32) void attn_f32_fwd_kernel(AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsF32 + threadIdx.x / 32;  // (b, h, t)
  const int T = p.seqlen, H = p.heads, Hk = p.kv_heads, P = p.head_dim;
  if (row >= int64_t(p.batch) * H * T) return;
  const int t = int(row % T), h = int(row / T % H), b = int(row / T / H), hk = h / (H / Hk);
  if (!p.rows.has(t)) return;
  const float *q = static_cast<const float*>(p.q), *k = static_cast<const float*>(p.k),
              *v = static_cast<const float*>(p.v);
  Row<L> qr, kr, vr, acc;
  qr.load(q + ((int64_t(b) * T + t) * H + h) * P, lane);
#pragma unroll
  for (int i = 0; i < L; ++i) acc.v[i] = 0.f;
  float m = -__int_as_float(0x7f800000), l = 0.f;  // -inf
  for (int s = attn::doc_start(seq_row(p, b), t); s <= t; ++s) {
    const int64_t kv = ((int64_t(b) * T + s) * Hk + hk) * P;
    kr.load(k + kv, lane);
    vr.load(v + kv, lane);
    const float x = qr.dot(kr) * p.scale, mn = fmaxf(m, x);
    const float c = expf(m - mn), e = expf(x - mn);
    l = l * c + e;
#pragma unroll
    for (int i = 0; i < L; ++i) acc.v[i] = acc.v[i] * c + e * vr.v[i];
    m = mn;
  }
  float* o = static_cast<float*>(p.o) + ((int64_t(b) * T + t) * H + h) * P;
#pragma unroll
  for (int i = 0; i < L; ++i) o[lane + 32 * i] = acc.v[i] / l;
  if (lane == 0) p.lse[(int64_t(b) * H + h) * T + t] = m + logf(l);
}

template <int L>
__global__ __launch_bounds__(32 * kWarpsF32) void attn_f32_dq_kernel(AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsF32 + threadIdx.x / 32;
  const int T = p.seqlen, H = p.heads, Hk = p.kv_heads, P = p.head_dim;
  if (row >= int64_t(p.batch) * H * T) return;
  const int t = int(row % T), h = int(row / T % H), b = int(row / T / H), hk = h / (H / Hk);
  const int64_t at = ((int64_t(b) * T + t) * H + h) * P, lane_t = (int64_t(b) * H + h) * T + t;
  const float *q = static_cast<const float*>(p.q), *k = static_cast<const float*>(p.k),
              *v = static_cast<const float*>(p.v);
  Row<L> go, orow, qr, kr, vr, dq;
  go.load(static_cast<const float*>(p.dout) + at, lane);
  orow.load(static_cast<const float*>(p.o) + at, lane);
  const float D = go.dot(orow);
  if (lane == 0) p.ws[lane_t] = D;
#pragma unroll
  for (int i = 0; i < L; ++i) dq.v[i] = 0.f;
  if (p.rows.has(t)) {
    qr.load(q + at, lane);
    const float lse = p.lse[lane_t];
    for (int s = attn::doc_start(seq_row(p, b), t); s <= t; ++s) {
      const int64_t kv = ((int64_t(b) * T + s) * Hk + hk) * P;
      kr.load(k + kv, lane);
      vr.load(v + kv, lane);
      const float pr = expf(qr.dot(kr) * p.scale - lse);
      const float ds = pr * (go.dot(vr) - D) * p.scale;
#pragma unroll
      for (int i = 0; i < L; ++i) dq.v[i] += ds * kr.v[i];
    }
  }
  float* out = static_cast<float*>(p.dq) + at;
#pragma unroll
  for (int i = 0; i < L; ++i) out[lane + 32 * i] = dq.v[i];
}

template <int L>
__global__ __launch_bounds__(32 * kWarpsF32) void attn_f32_dkv_kernel(AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsF32 + threadIdx.x / 32;  // (b, hk, s)
  const int T = p.seqlen, H = p.heads, Hk = p.kv_heads, P = p.head_dim, group = H / Hk;
  if (row >= int64_t(p.batch) * Hk * T) return;
  const int s = int(row % T), hk = int(row / T % Hk), b = int(row / T / Hk);
  const int64_t kv = ((int64_t(b) * T + s) * Hk + hk) * P;
  const float* q = static_cast<const float*>(p.q);
  const float* dout = static_cast<const float*>(p.dout);
  Row<L> kr, vr, qr, go, dk, dv;
  kr.load(static_cast<const float*>(p.k) + kv, lane);
  vr.load(static_cast<const float*>(p.v) + kv, lane);
#pragma unroll
  for (int i = 0; i < L; ++i) dk.v[i] = 0.f, dv.v[i] = 0.f;
  const int end = attn::doc_end(seq_row(p, b), s, p.seqlen);
  for (int h = hk * group; h < (hk + 1) * group; ++h)
    for (int t = s; t < end; ++t) {
      if (!p.rows.has(t)) continue;
      const int64_t at = ((int64_t(b) * T + t) * H + h) * P, lane_t = (int64_t(b) * H + h) * T + t;
      qr.load(q + at, lane);
      go.load(dout + at, lane);
      const float pr = expf(qr.dot(kr) * p.scale - p.lse[lane_t]);
      const float ds = pr * (go.dot(vr) - p.ws[lane_t]) * p.scale;
#pragma unroll
      for (int i = 0; i < L; ++i) dv.v[i] += pr * go.v[i], dk.v[i] += ds * qr.v[i];
    }
  float *dkp = static_cast<float*>(p.dk) + kv, *dvp = static_cast<float*>(p.dv) + kv;
#pragma unroll
  for (int i = 0; i < L; ++i) dkp[lane + 32 * i] = dk.v[i], dvp[lane + 32 * i] = dv.v[i];
}

unsigned blocks_for(int64_t rows) {
  return unsigned((rows + kWarpsF32 - 1) / kWarpsF32);
}

}  // namespace

void attention_fwd_f32_cuda(const AttnParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned grid = blocks_for(int64_t(p.batch) * p.heads * p.seqlen);
  if (p.head_dim == 64)
    attn_f32_fwd_kernel<2><<<grid, 32 * kWarpsF32, 0, stream>>>(p);
  else
    attn_f32_fwd_kernel<4><<<grid, 32 * kWarpsF32, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

void attention_bwd_f32_cuda(const AttnParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned q_grid = blocks_for(int64_t(p.batch) * p.heads * p.seqlen);
  const unsigned kv_grid = blocks_for(int64_t(p.batch) * p.kv_heads * p.seqlen);
  if (p.head_dim == 64) {
    attn_f32_dq_kernel<2><<<q_grid, 32 * kWarpsF32, 0, stream>>>(p);
    attn_f32_dkv_kernel<2><<<kv_grid, 32 * kWarpsF32, 0, stream>>>(p);
  } else {
    attn_f32_dq_kernel<4><<<q_grid, 32 * kWarpsF32, 0, stream>>>(p);
    attn_f32_dkv_kernel<4><<<kv_grid, 32 * kWarpsF32, 0, stream>>>(p);
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
