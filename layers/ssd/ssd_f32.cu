// SSD in f32 on the GPU: the f32 runs of the training path (train.precision = fp32, the
// GPU-vs-CPU check), not the fast path (the chunked bf16 tensor-core kernels of ssd_fwd.cu and
// ssd_bwd.cu). The recurrence of ssd.h step by step, as the CPU reference computes it:
//   one block of 1024 threads per (b, h); warp w holds state rows p = w R .. w R + R - 1
//   (R = P / 32), lane l the columns n = l + 32 j (j < N / 32), in registers.
//   forward, each t: the document reset, h = e^(dt A) h + dt x_t B_t^T, y_t[p] = C_t . h[p,:]
//     (a warp sum) + D x_t[p].
//   backward: a forward pass keeps the state entering every segment of kSeg tokens (checkpoints);
//     then, segment by segment from the last, the segment's states are recomputed and kept, and
//     the gradient state g = dh runs backwards through them:
//       g += dy_t C_t^T;  dx_t = D dy_t + dt g B_t;  dC_t += dy_t^T h_t;  dB_t += dt g^T x_t;
//       ddt_t = sum g (x_t B_t^T) + A e^(dt A) sum g h_{t-1};  dA += dt e^(dt A) sum g h_{t-1};
//       g = e^(dt A) g (0 across a document start).
//     Sums over the block (dC_t, dB_t over p; the scalars) go through shared memory in warp
//     order; dB, dC per head are summed over the heads of a group, and dA, ddt_bias, dD over the
//     batch, by a second kernel in a fixed order: deterministic, no atomics.
// Workspace: SsdF32Layout (ssd_cuda.h).
#include <cuda_runtime.h>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/ssd/ssd_cuda.h"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

constexpr int kThreadsF32 = 1024, kWarps = 32;

// dt after the bias, softplus and clamp, and d dt / d dt_raw (0 where clamped).
__device__ void dt_of(const SsdParams& p, int b, int t, int h, float& dt, float& grad) {
  const float raw =
      p.dt[(int64_t(b) * p.seqlen + t) * p.heads + h] + (p.dt_bias ? p.dt_bias[h] : 0.f);
  const float sp = p.dt_softplus ? (raw > 20.f ? raw : log1pf(expf(raw))) : raw;
  dt = fminf(fmaxf(sp, p.dt_min), p.dt_max);
  grad = sp < p.dt_min || sp > p.dt_max ? 0.f : p.dt_softplus ? 1.f / (1.f + expf(-raw)) : 1.f;
}

__device__ int doc_of(const SsdParams& p, int b, int t) {
  return p.seq_idx ? p.seq_idx[int64_t(b) * p.seqlen + t] : 0;
}

template <int R, int J>  // rows per warp (P / 32), columns per lane (N / 32)
struct Lane {
  const SsdParams& p;
  int b, h, g, w, l;
  __device__ int64_t row(int t) const { return (int64_t(b) * p.seqlen + t); }
  __device__ float x(int t, int r) const {
    return static_cast<const float*>(p.x)[(row(t) * p.heads + h) * p.head_dim + w * R + r];
  }
  __device__ float dy(int t, int r) const {
    return static_cast<const float*>(p.dy)[(row(t) * p.heads + h) * p.head_dim + w * R + r];
  }
  __device__ void bc(const void* src, int t, float (&v)[J]) const {
    const float* s = static_cast<const float*>(src) + (row(t) * p.groups + g) * p.d_state;
#pragma unroll
    for (int j = 0; j < J; ++j) v[j] = s[l + 32 * j];
  }
  __device__ float D(int r) const {
    return !p.D ? 0.f : p.d_per_channel ? p.D[h * p.head_dim + w * R + r] : p.D[h];
  }
  // A [P,N] state of this (b, h) at `base`: this thread's elements.
  __device__ void load(const float* base, float (&s)[R][J]) const {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) s[r][j] = base ? base[(w * R + r) * p.d_state + l + 32 * j] : 0.f;
  }
  __device__ void store(float* base, const float (&s)[R][J]) const {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) base[(w * R + r) * p.d_state + l + 32 * j] = s[r][j];
  }
  // One step of the recurrence: h = keep e^(dt A) h + dt x_t B_t^T.
  __device__ void step(int t, float (&s)[R][J], bool keep, float dt, float a) const {
    float Bv[J];
    bc(p.B, t, Bv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float xv = dt * x(t, r);
#pragma unroll
      for (int j = 0; j < J; ++j) s[r][j] = (keep ? a * s[r][j] : 0.f) + xv * Bv[j];
    }
  }
};

constexpr int kSeg = kSsdF32Seg;  // tokens per recomputed segment

template <int R, int J>
__global__ __launch_bounds__(kThreadsF32) void ssd_f32_fwd_kernel(SsdParams p) {
  const int h = blockIdx.x, b = blockIdx.y, w = threadIdx.x / 32, l = threadIdx.x & 31;
  const Lane<R, J> L{p, b, h, h / (p.heads / p.groups), w, l};
  const int64_t bh = int64_t(b) * p.heads + h, pn = int64_t(p.head_dim) * p.d_state;
  float s[R][J];
  L.load(p.initial_state ? p.initial_state + bh * pn : nullptr, s);
  const float A = p.A[h];
  float* y = static_cast<float*>(p.y);
  for (int t = 0; t < p.seqlen; ++t) {
    float dt, unused;
    dt_of(p, b, t, h, dt, unused);
    const bool keep = t == 0 || doc_of(p, b, t) == doc_of(p, b, t - 1);
    L.step(t, s, keep, dt, expf(dt * A));
    float Cv[J];
    L.bc(p.C, t, Cv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) acc += Cv[j] * s[r][j];
      acc = warp_sum(acc);
      if (l == 0) y[(L.row(t) * p.heads + h) * p.head_dim + w * R + r] = acc + L.D(r) * L.x(t, r);
    }
  }
  if (p.final_state) L.store(p.final_state + bh * pn, s);
}

template <int R, int J>
__global__ __launch_bounds__(kThreadsF32) void ssd_f32_bwd_kernel(SsdParams p) {
  const int h = blockIdx.x, b = blockIdx.y, w = threadIdx.x / 32, l = threadIdx.x & 31;
  const int N = p.d_state, T = p.seqlen;
  const Lane<R, J> L{p, b, h, h / (p.heads / p.groups), w, l};
  const int64_t bh = int64_t(b) * p.heads + h, pn = int64_t(p.head_dim) * N;
  const SsdF32Layout lay = ssd_f32_layout(p.batch, T, p.heads, p.head_dim, N);
  float* ckpt = p.ws + lay.ckpt + bh * lay.nseg * pn;  // the state entering segment k
  float* seg = p.ws + lay.seg + bh * kSeg * pn;        // the segment's states h_t
  const float* h0 = p.initial_state ? p.initial_state + bh * pn : nullptr;
  const float A = p.A[h];
  // Forward, keeping the checkpoints.
  float s[R][J];
  L.load(h0, s);
  for (int t = 0; t < T; ++t) {
    if (t % kSeg == 0) L.store(ckpt + (t / kSeg) * pn, s);
    float dt, unused;
    dt_of(p, b, t, h, dt, unused);
    L.step(t, s, t == 0 || doc_of(p, b, t) == doc_of(p, b, t - 1), dt, expf(dt * A));
  }
  // Backward. Shared memory, double-buffered by step: per warp its dC and dB column sums, then
  // its two scalar sums.
  extern __shared__ float sh[];
  const int per_buf = kWarps * (2 * N + 2);
  float g[R][J];
  L.load(p.dfinal_state ? p.dfinal_state + bh * pn : nullptr, g);
  float dA_acc = 0.f, bias_acc = 0.f, dD_acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) dD_acc[r] = 0.f;
  float* dx = static_cast<float*>(p.dx);
  for (int k = int(lay.nseg) - 1; k >= 0; --k) {
    const int t0 = k * kSeg, t1 = min(T, t0 + kSeg);
    L.load(ckpt + k * pn, s);
    for (int t = t0; t < t1; ++t) {
      float dt, unused;
      dt_of(p, b, t, h, dt, unused);
      L.step(t, s, t == 0 || doc_of(p, b, t) == doc_of(p, b, t - 1), dt, expf(dt * A));
      L.store(seg + (t - t0) * pn, s);  // read back by this thread only
    }
    for (int t = t1 - 1; t >= t0; --t) {
      float dt, dt_grad;
      dt_of(p, b, t, h, dt, dt_grad);
      const float a = expf(dt * A);
      const bool keep = t == 0 || doc_of(p, b, t) == doc_of(p, b, t - 1);
      float ht[R][J], prev[R][J], Bv[J], Cv[J], dc[J], db[J];
      L.load(seg + (t - t0) * pn, ht);
      L.load(t > t0 ? seg + (t - 1 - t0) * pn : t > 0 ? ckpt + k * pn : h0, prev);
      L.bc(p.B, t, Bv);
      L.bc(p.C, t, Cv);
      float gdt = 0.f, gdecay = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) dc[j] = 0.f, db[j] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float gy = L.dy(t, r), xv = L.x(t, r);
        dD_acc[r] += gy * xv;
        float gx = 0.f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          dc[j] += gy * ht[r][j];
          g[r][j] += gy * Cv[j];
          gx += g[r][j] * Bv[j];
          db[j] += g[r][j] * xv;
          gdt += g[r][j] * xv * Bv[j];
          if (keep) gdecay += g[r][j] * prev[r][j];
        }
        gx = warp_sum(gx);
        if (l == 0) dx[(L.row(t) * p.heads + h) * p.head_dim + w * R + r] = L.D(r) * gy + dt * gx;
      }
      float* buf = sh + (t & 1) * per_buf;
#pragma unroll
      for (int j = 0; j < J; ++j) buf[w * N + l + 32 * j] = dc[j];
#pragma unroll
      for (int j = 0; j < J; ++j) buf[kWarps * N + w * N + l + 32 * j] = db[j];
      gdt = warp_sum(gdt), gdecay = warp_sum(gdecay);
      if (l == 0) buf[2 * kWarps * N + 2 * w] = gdt, buf[2 * kWarps * N + 2 * w + 1] = gdecay;
      __syncthreads();
      // The block's sums, in warp order (the next step writes the other buffer).
      const int i = threadIdx.x;
      if (i < 2 * N) {
        const int which = i / N, n = i % N;
        float v = 0.f;
        for (int q = 0; q < kWarps; ++q) v += buf[which * kWarps * N + q * N + n];
        const int64_t at = (L.row(t) * p.heads + h) * N + n;
        if (which == 0)
          p.ws[lay.dch + at] = v;
        else
          p.ws[lay.dbh + at] = dt * v;
      } else if (i == 2 * N) {
        float sgdt = 0.f, sdecay = 0.f;
        for (int q = 0; q < kWarps; ++q)
          sgdt += buf[2 * kWarps * N + 2 * q], sdecay += buf[2 * kWarps * N + 2 * q + 1];
        sgdt += sdecay * a * A;
        dA_acc += sdecay * a * dt;
        const float raw_grad = sgdt * dt_grad;
        p.ddt[L.row(t) * p.heads + h] = raw_grad;
        bias_acc += raw_grad;
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < J; ++j) g[r][j] = keep ? g[r][j] * a : 0.f;
    }
  }
  if (p.dinitial_state) L.store(p.dinitial_state + bh * pn, g);
  if (threadIdx.x == 2 * N) p.ws[lay.pa + bh] = dA_acc, p.ws[lay.pbias + bh] = bias_acc;
  if (l == 0)
#pragma unroll
    for (int r = 0; r < R; ++r) p.ws[lay.pd + bh * p.head_dim + w * R + r] = dD_acc[r];
}

// dB, dC [B,T,G,N] (=): the heads of each group in order; dA, ddt_bias, dD (+=): the batch rows in
// order (dD per head: then its channels in order).
__global__ void ssd_f32_finish_kernel(SsdParams p) {
  const int N = p.d_state, hpg = p.heads / p.groups;
  const SsdF32Layout lay = ssd_f32_layout(p.batch, p.seqlen, p.heads, p.head_dim, N);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = int64_t(p.batch) * p.seqlen * p.groups * N;
  if (i < rows) {
    const int n = int(i % N), g = int(i / N % p.groups);
    const int64_t bt = i / N / p.groups;
    float db = 0.f, dc = 0.f;
    for (int h = g * hpg; h < (g + 1) * hpg; ++h) {
      const int64_t at = (bt * p.heads + h) * N + n;
      db += p.ws[lay.dbh + at], dc += p.ws[lay.dch + at];
    }
    static_cast<float*>(p.dB)[i] = db, static_cast<float*>(p.dC)[i] = dc;
    return;
  }
  const int64_t j = i - rows;  // then one thread per head
  if (j >= p.heads) return;
  const int h = int(j);
  float da = 0.f, dbias = 0.f;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t bh = int64_t(b) * p.heads + h;
    da += p.ws[lay.pa + bh], dbias += p.ws[lay.pbias + bh];
  }
  p.dA[h] += da;
  if (p.ddt_bias) p.ddt_bias[h] += dbias;
  if (!p.dD) return;
  if (p.d_per_channel) {
    for (int c = 0; c < p.head_dim; ++c) {
      float v = 0.f;
      for (int b = 0; b < p.batch; ++b)
        v += p.ws[lay.pd + (int64_t(b) * p.heads + h) * p.head_dim + c];
      p.dD[h * p.head_dim + c] += v;
    }
  } else {
    float v = 0.f;
    for (int b = 0; b < p.batch; ++b)
      for (int c = 0; c < p.head_dim; ++c)
        v += p.ws[lay.pd + (int64_t(b) * p.heads + h) * p.head_dim + c];
    p.dD[h] += v;
  }
}

template <int R, int J>
void launch_fwd(const SsdParams& p, cudaStream_t stream) {
  ssd_f32_fwd_kernel<R, J>
      <<<dim3(unsigned(p.heads), unsigned(p.batch)), kThreadsF32, 0, stream>>>(p);
}

template <int R, int J>
void launch_bwd(const SsdParams& p, cudaStream_t stream) {
  const size_t smem = 2 * size_t(kWarps) * (2 * p.d_state + 2) * sizeof(float);
  CUDA_CHECK(cudaFuncSetAttribute(ssd_f32_bwd_kernel<R, J>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  ssd_f32_bwd_kernel<R, J>
      <<<dim3(unsigned(p.heads), unsigned(p.batch)), kThreadsF32, smem, stream>>>(p);
}

using Launch = void (*)(const SsdParams&, cudaStream_t);
struct Launchers {
  Launch fwd, bwd;
};

// The kernels for (P, N): R = P / 32 rows per warp, J = N / 32 columns per lane.
Launchers launchers(const SsdParams& p) {
  switch (p.head_dim * 1000 + p.d_state) {
    case 64064:
      return {launch_fwd<2, 2>, launch_bwd<2, 2>};
    case 64128:
      return {launch_fwd<2, 4>, launch_bwd<2, 4>};
    case 64256:
      return {launch_fwd<2, 8>, launch_bwd<2, 8>};
    case 128064:
      return {launch_fwd<4, 2>, launch_bwd<4, 2>};
    case 128128:
      return {launch_fwd<4, 4>, launch_bwd<4, 4>};
    case 128256:
      return {launch_fwd<4, 8>, launch_bwd<4, 8>};
    default:
      BRAID_FAIL("ssd (CUDA, f32): no kernel for head dim ", p.head_dim, ", d_state ", p.d_state);
  }
}

}  // namespace

void ssd_fwd_f32_cuda(const SsdParams& p, void* stream) {
  launchers(p).fwd(p, static_cast<cudaStream_t>(stream));
  CUDA_CHECK(cudaGetLastError());
}

void ssd_bwd_f32_cuda(const SsdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  launchers(p).bwd(p, stream);
  CUDA_CHECK(cudaGetLastError());
  const int64_t work = int64_t(p.batch) * p.seqlen * p.groups * p.d_state + p.heads;
  ssd_f32_finish_kernel<<<unsigned((work + 255) / 256), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
