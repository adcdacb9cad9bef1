// Selective scan forward on the GPU, state-parallel: a thread owns kS states of one channel and
// walks the whole sequence in order, so the recurrence h = exp(dt A_n) h + dt B_n u costs one
// ex2 and four FP32 instructions per (step, state), with no scan over time and no replay:
//   a = ex2(dt A_n log2 e); h = a h + dtu B_n; p_t += C_n h        (dtu = dt u)
// The kLanes threads of a channel hold its states n = j + kLanes s (lane j, s < kS; states past N
// are padding with B = C = 0, so they stay 0). Every kLanes steps their per-step partial sums
// p_t are reduced across the lanes by a shuffle reduce-scatter (4 (kLanes - 1) instructions),
// which leaves lane j with y at step j of the group: it adds D u, applies the gate and writes y.
// Per (step, state): 1 MUFU (8 cycles per warp per SM quarter) against ~6-8 issued
// instructions, so with kLanes = 4 or 8 the loop is bound by the MUFU pipe, the floor of any
// method that evaluates exp(dt A_n) per (step, state).
//
// A block is 128 threads: kCh = 128 / kLanes channels of one group and one batch row. It walks
// the sequence in chunks of kL = 32 steps. Per chunk:
//   1. the raw chunk (u, delta, z as [step][channel], B and C as [step][state]) was staged into
//      shared memory by cp.async while the previous chunk computed (plain loads when rows are not
//      16-byte pieces);
//   2. prep: dt = softplus(delta + bias) and dt u per (channel, step), D u and silu(z), B and C
//      transposed to [state][step] in f32, and (document resets) a bit per step;
//   3. the loop above, then the block's y tile is stored in [step][channel] rows.
// Every 128 steps the states are saved into the workspace for the backward (the state entering
// each of its 128-step chunks). Document resets: at a step whose seq_idx differs from the
// previous step's, h = dtu B (a select: with dt < 0 a state can overflow, and a reset must
// still drop it). Past the end of the sequence dt = 0 and B = C = 0: h is unchanged.
//
// The number of lanes per channel trades work for parallelism: kLanes = 4 has the cheapest
// reduction (and shared-memory traffic, the other limit: B and C cost one read per pair),
// 8 puts twice the warps on the GPU. N <= 16 runs with 4 or 8 lanes (chosen by size, see
// fwd_lanes), N <= 64 with 4 lanes of 16 states, N <= 256 with 16 lanes of 16.
#include <cuda_runtime.h>

#include "layers/selective_scan/selective_scan_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

using namespace scan;

constexpr int kThreads = 128;

template <int kLanes, int kS>
struct Fwd {
  static constexpr int kCh = kThreads / kLanes;  // channels per block
  static constexpr int kNp = kLanes * kS;        // states held, padded
  static constexpr int kL = 32;                  // steps per chunk (divides the saved 128)
  // Row strides of the [channel][step] (float2) and [state][step] (f32) tiles: 16-byte aligned
  // rows that start 4 banks apart, so the lanes' 16-byte reads of different rows do not collide.
  static constexpr int kDd = kL + 2, kRow = kL + 4;
  static_assert(kCh * kLanes == kThreads && kL % kLanes == 0 && 128 % kL == 0);

  // Per-block smem pieces, in order; T is the activation type.
  template <typename T>
  static size_t smem(int n) {
    SmemCarver c{nullptr};
    carve<T>(c, n);
    return c.used;
  }
  template <typename T>
  struct Smem {
    T *raw_act, *raw_bc, *out;
    float2 *dd, *fin;
    float* bc;
    unsigned* resets;
  };
  template <typename T>
  __host__ __device__ static Smem<T> carve(SmemCarver& c, int n) {
    Smem<T> s;
    s.raw_act = c.take<T>(3 * kL * kCh);   // u, delta, z: [3][kL][kCh]
    s.raw_bc = c.take<T>(2 * kL * n);      // B, C: [2][kL][N]
    s.dd = c.take<float2>(kCh * kDd);      // {dt, dt u}: [kCh][kDd]
    s.fin = c.take<float2>(kCh * kDd);     // {D u, silu(z) or 1}: [kCh][kDd]
    s.bc = c.take<float>(2 * kNp * kRow);  // B, C: [2][kNp][kRow]
    s.out = c.take<T>(kCh * kL);           // y: [kCh][kL]
    s.resets = c.take<unsigned>(1);        // bit r: step t0 + r starts a document
    return s;
  }

  // cp.async staging needs every row piece to be whole 16-byte pieces at 16-byte addresses.
  template <typename T>
  static bool can_stage_async(const ScanParams& p) {
    auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
    const int cpg = p.channels / p.groups;
    return cpg % kCh == 0 && (kCh * sizeof(T)) % 16 == 0 && (p.d_state * sizeof(T)) % 16 == 0 &&
           aligned(p.u) && aligned(p.delta) && (!p.z || aligned(p.z)) && aligned(p.B) &&
           aligned(p.C);
  }
};

// Reduce-scatter over the kN lanes of a channel: lane j ends with the sum over the lanes of
// v[j] in v[0]. Each level (kW = kN / 2, ..., 1) halves the values a lane holds: it keeps the
// half its lane bit kW selects and adds the partner's copy of that half. (A template recursion,
// so that every index is a constant and v stays in registers.)
template <int kW, int kN>
__device__ __forceinline__ void reduce_scatter(float (&v)[kN], int j) {
  if constexpr (kW >= 1) {
    const bool up = (j & kW) != 0;
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      const float send = up ? v[i] : v[i + kW], keep = up ? v[i + kW] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kW);
    }
    reduce_scatter<kW / 2>(v, j);
  }
}

template <typename T, int kLanes, int kS>
__device__ __forceinline__ void stage(const ScanParams& p, int b, int g, int c0, int nch, int t0,
                                      const typename Fwd<kLanes, kS>::template Smem<T>& s) {
  using F = Fwd<kLanes, kS>;
  constexpr int kL = F::kL, kCh = F::kCh, kE = 16 / sizeof(T);  // elements per 16-byte piece
  const int N = p.d_state, tid = threadIdx.x;
  // (selects, not arrays indexed at run time, which would live in local memory)
  auto act = [&](int m) { return static_cast<const T*>(m == 0 ? p.u : m == 1 ? p.delta : p.z); };
  auto mat = [&](int m) { return static_cast<const T*>(m == 0 ? p.B : p.C); };
  const int nact = p.z ? 3 : 2;
  const int64_t row0 = static_cast<int64_t>(b) * p.seqlen;  // first row of the batch
  const int64_t bc_stride = static_cast<int64_t>(p.groups) * N;
  if (p.stage_async) {
    // Rows past the end are zero-filled; the source address stays a valid one.
    constexpr int kPa = kCh / kE;  // pieces per activation row
    for (int i = tid; i < nact * kL * kPa; i += kThreads) {
      const int m = i / (kL * kPa), r = i / kPa % kL, part = i % kPa, t = t0 + r;
      const bool ok = t < p.seqlen;
      const T* src = act(m) + (row0 + (ok ? t : 0)) * p.channels + c0 + part * kE;
      cp_async16(s.raw_act + (m * kL + r) * kCh + part * kE, src, ok);
    }
    const int pb = N / kE;  // pieces per B/C row
    for (int i = tid; i < 2 * kL * pb; i += kThreads) {
      const int m = i / (kL * pb), r = i / pb % kL, part = i % pb, t = t0 + r;
      const bool ok = t < p.seqlen;
      const T* src = mat(m) + (row0 + (ok ? t : 0)) * bc_stride + g * N + part * kE;
      cp_async16(s.raw_bc + (m * kL + r) * N + part * kE, src, ok);
    }
    cp_async_commit();
  } else {
    for (int i = tid; i < nact * kL * kCh; i += kThreads) {
      const int m = i / (kL * kCh), r = i / kCh % kL, ch = i % kCh, t = t0 + r;
      s.raw_act[i] =
          t < p.seqlen && ch < nch ? act(m)[(row0 + t) * p.channels + c0 + ch] : from_float<T>(0.f);
    }
    for (int i = tid; i < 2 * kL * N; i += kThreads) {
      const int m = i / (kL * N), r = i / N % kL, n = i % N, t = t0 + r;
      s.raw_bc[i] = t < p.seqlen ? mat(m)[(row0 + t) * bc_stride + g * N + n] : from_float<T>(0.f);
    }
  }
}

template <typename T, bool kReset, int kLanes, int kS>
__global__ void __launch_bounds__(kThreads, kLanes* kS <= 16 ? 5 : (kLanes * kS <= 64 ? 4 : 2))
    scan_fwd_kernel(const ScanParams p) {
  using F = Fwd<kLanes, kS>;
  constexpr int kL = F::kL, kCh = F::kCh, kNp = F::kNp, kDd = F::kDd, kRow = F::kRow;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SmemCarver carver{smem_raw};
  const auto s = F::template carve<T>(carver, p.d_state);
  const int N = p.d_state, tid = threadIdx.x;
  // The block's place: batch row b, group g, channels c0 .. c0 + nch - 1.
  const int cpg = p.channels / p.groups, per_group = (cpg + kCh - 1) / kCh;
  const int b = blockIdx.y, g = blockIdx.x / per_group;
  const int c0 = g * cpg + blockIdx.x % per_group * kCh, nch = min(kCh, cpg - (c0 - g * cpg));
  // This thread in the loop: channel slot ch, lane j; in the prep: channel slot pc.
  const int ch = tid / kLanes, j = tid % kLanes, c = c0 + ch;
  const bool active = ch < nch;
  const int pc = tid % kCh;
  const float bias = pc < nch && p.delta_bias ? p.delta_bias[c0 + pc] : 0.f;
  const float d_skip = pc < nch && p.D ? p.D[c0 + pc] : 0.f;
  const int64_t bc_ch = static_cast<int64_t>(b) * p.channels + c;  // [B,C] row of this thread
  float h[kS], a2[kS];
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int n = j + kLanes * k;
    const bool ok = active && n < N;
    a2[k] = ok ? p.A[static_cast<int64_t>(c) * N + n] * kLog2e : 0.f;
    h[k] = ok && p.initial_state ? p.initial_state[bc_ch * N + n] : 0.f;
  }
  const int saved_chunks = (p.seqlen + kScanChunk - 1) / kScanChunk;
  const int chunks = (p.seqlen + kL - 1) / kL;
  stage<T, kLanes, kS>(p, b, g, c0, nch, 0, s);
  for (int k = 0; k < chunks; ++k) {
    const int t0 = k * kL;
    cp_async_wait();
    __syncthreads();  // the raw chunk is in; the previous chunk's tiles are free
    // Prep: thread (pc, steps r = tid / kCh + i kThreads / kCh).
    for (int r = tid / kCh; r < kL; r += kThreads / kCh) {
      const float uv = to_float(s.raw_act[r * kCh + pc]);
      float d = to_float(s.raw_act[(kL + r) * kCh + pc]) + bias;
      if (p.delta_softplus) d = softplus(d);
      d = t0 + r < p.seqlen ? d : 0.f;
      float gate = 1.f;
      if (p.z) {
        const float zv = to_float(s.raw_act[(2 * kL + r) * kCh + pc]);
        gate = zv * sigmoid(zv);
      }
      s.dd[pc * kDd + r] = make_float2(d, d * uv);
      s.fin[pc * kDd + r] = make_float2(d_skip * uv, gate);
    }
    for (int i = tid; i < 2 * kNp * kL; i += kThreads) {
      const int r = i % kL, n = i / kL % kNp, m = i / (kL * kNp);
      s.bc[(m * kNp + n) * kRow + r] = n < N ? to_float(s.raw_bc[(m * kL + r) * N + n]) : 0.f;
    }
    if (kReset && tid < 32) {
      const int t = t0 + tid;
      const int32_t* seq = p.seq_idx + static_cast<int64_t>(b) * p.seqlen;
      const unsigned m = __ballot_sync(0xffffffffu, t > 0 && t < p.seqlen && seq[t] != seq[t - 1]);
      if (tid == 0) *s.resets = m;
    }
    __syncthreads();  // tiles ready; the raw buffer is free: stage the next chunk
    if (k + 1 < chunks) stage<T, kLanes, kS>(p, b, g, c0, nch, t0 + kL, s);
    if (p.chunk_states && t0 % kScanChunk == 0 && active) {
      float* dst =
          p.chunk_states +
          ((static_cast<int64_t>(b) * saved_chunks + t0 / kScanChunk) * p.channels + c) * N;
#pragma unroll
      for (int k2 = 0; k2 < kS; ++k2)
        if (j + kLanes * k2 < N) dst[j + kLanes * k2] = h[k2];
    }
    const unsigned resets = kReset ? *s.resets : 0u;
    const float4* dd_row = reinterpret_cast<const float4*>(s.dd + ch * kDd);
    const float* b_row = s.bc + j * kRow;
    const float* c_row = s.bc + (kNp + j) * kRow;
#pragma unroll 1
    for (int r0 = 0; r0 < kL; r0 += kLanes) {
      float dt[kLanes], dtu[kLanes], part[kLanes];
#pragma unroll
      for (int i = 0; i < kLanes / 2; ++i) {
        const float4 v = dd_row[r0 / 2 + i];
        dt[2 * i] = v.x, dtu[2 * i] = v.y, dt[2 * i + 1] = v.z, dtu[2 * i + 1] = v.w;
      }
#pragma unroll
      for (int k2 = 0; k2 < kS; ++k2) {
        float bv[kLanes], cv[kLanes];
#pragma unroll
        for (int i = 0; i < kLanes / 4; ++i) {
          const float4 x =
              *reinterpret_cast<const float4*>(b_row + k2 * kLanes * kRow + r0 + 4 * i);
          const float4 y =
              *reinterpret_cast<const float4*>(c_row + k2 * kLanes * kRow + r0 + 4 * i);
          bv[4 * i] = x.x, bv[4 * i + 1] = x.y, bv[4 * i + 2] = x.z, bv[4 * i + 3] = x.w;
          cv[4 * i] = y.x, cv[4 * i + 1] = y.y, cv[4 * i + 2] = y.z, cv[4 * i + 3] = y.w;
        }
#pragma unroll
        for (int i = 0; i < kLanes; ++i) {
          const float a = ex2(dt[i] * a2[k2]), bb = dtu[i] * bv[i];
          h[k2] = kReset && (resets >> (r0 + i) & 1u) ? bb : fmaf(a, h[k2], bb);
          part[i] = k2 == 0 ? cv[i] * h[k2] : fmaf(cv[i], h[k2], part[i]);
        }
      }
      reduce_scatter<kLanes / 2>(part, j);
      const float y = part[0];
      const float2 f = s.fin[ch * kDd + r0 + j];
      s.out[ch * kL + r0 + j] = from_float<T>((y + f.x) * f.y);
    }
    __syncthreads();  // the y tile is complete
    // Store y rows [t][c0 .. c0 + nch): 16-byte pieces where the rows are whole.
    T* y_out = static_cast<T*>(p.y) + static_cast<int64_t>(b) * p.seqlen * p.channels + c0;
    constexpr int kE = 16 / sizeof(T);
    if (p.stage_async) {
      for (int i = tid; i < kL * kCh / kE; i += kThreads) {
        const int r = i / (kCh / kE), part = i % (kCh / kE);
        if (t0 + r >= p.seqlen) continue;
        alignas(16) T v[kE];
#pragma unroll
        for (int e = 0; e < kE; ++e) v[e] = s.out[(part * kE + e) * kL + r];
        *reinterpret_cast<uint4*>(y_out + static_cast<int64_t>(t0 + r) * p.channels + part * kE) =
            *reinterpret_cast<const uint4*>(v);
      }
    } else {
      for (int i = tid; i < kL * kCh; i += kThreads) {
        const int r = i / kCh, cc = i % kCh;
        if (t0 + r < p.seqlen && cc < nch)
          y_out[static_cast<int64_t>(t0 + r) * p.channels + cc] = s.out[cc * kL + r];
      }
    }
  }
  if (p.final_state && active)
#pragma unroll
    for (int k2 = 0; k2 < kS; ++k2)
      if (j + kLanes * k2 < N) p.final_state[bc_ch * N + j + kLanes * k2] = h[k2];
}

template <typename T, bool kReset, int kLanes, int kS>
void launch(ScanParams p, cudaStream_t stream) {
  using F = Fwd<kLanes, kS>;
  p.stage_async = F::template can_stage_async<T>(p);
  const size_t smem = F::template smem<T>(p.d_state);
  auto* kernel = scan_fwd_kernel<T, kReset, kLanes, kS>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  const int per_group = (p.channels / p.groups + F::kCh - 1) / F::kCh;
  kernel<<<dim3(p.groups * per_group, p.batch), kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

// Lanes per channel for N <= 16: 8 (twice the warps of 4, to hide latency) when all its blocks
// fit on the GPU at once, since a block runs for the whole sequence and a second, partial wave
// would idle most of the GPU; else 4 (the least work per step).
template <typename T, bool kReset>
int fwd_lanes(const ScanParams& p) {
  if (p.fwd_lanes != 0) return p.fwd_lanes;
  using F = Fwd<8, 2>;
  auto* kernel = scan_fwd_kernel<T, kReset, 8, 2>;
  const size_t smem = F::smem<T>(p.d_state);
  int dev = 0, sms = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t blocks =
      static_cast<int64_t>(p.batch) * p.groups * ((p.channels / p.groups + F::kCh - 1) / F::kCh);
  return blocks <= static_cast<int64_t>(per_sm) * sms ? 8 : 4;
}

}  // namespace

void selective_scan_fwd_cuda(const ScanParams& p, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  BRAID_CHECK(p.fwd_lanes == 0 || ((p.fwd_lanes == 4 || p.fwd_lanes == 8) && p.d_state <= 16),
              "selective_scan (CUDA): fwd_lanes must be 0, or 4 or 8 with d_state <= 16; got ",
              p.fwd_lanes, " with d_state ", p.d_state);
  dispatch_scan(p, [&](auto t, auto reset) {
    using T = decltype(t);
    constexpr bool kR = decltype(reset)::value;
    if (p.d_state > 64) return launch<T, kR, 16, 16>(p, st);
    if (p.d_state > 16) return launch<T, kR, 4, 16>(p, st);
    if (fwd_lanes<T, kR>(p) == 8) return launch<T, kR, 8, 2>(p, st);
    return launch<T, kR, 4, 4>(p, st);
  });
}

}  // namespace braid
