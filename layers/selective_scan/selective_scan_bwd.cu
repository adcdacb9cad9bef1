// Selective scan backward on the GPU (layout in selective_scan_tiles.cuh). Chunks are visited in
// reverse, each starting from the state the forward saved at its start. With out_t = sum_n
// C_t,n h_t,n + D u_t, dout = dy silu(z) and g_t,n = dL/dh_t,n:
//   g_t = dout_t C_t + q_t+1,   q_t = a_t g_t (0 at a document start),   q_T = dfinal_state
//   du_t = dt_t sum_n g B + D dout_t      ddt_t = sum_n g (A_n a_t h_t-1 + u_t B)
//   dB_t = sum_c g dt u (over the group's channels)   dC_t = sum_c dout h
//   dA_n += sum_t g a h_t-1 dt            dD += sum_t dout u      ddelta_bias += sum_t ddelta
// For each state the forward maps (h -> A h + H) and the reverse maps (q -> A q + Q; the same A)
// of the 16 lanes of a channel are composed by two shuffle scans; replaying the thread's steps
// gives h and g. Every sum is deterministic: over a channel's steps by fixed shuffle trees and
// sequential chunks, over the block's channels through shared memory in a fixed order, and over
// blocks and batch rows by the finishing kernels, which add per-block partial sums in order.
#include "layers/selective_scan/selective_scan_tiles.cuh"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

using namespace scan;
using Tl = Tiles<kScanChunk>;
constexpr int kL = kScanChunk, kItems = Tl::kItems;

constexpr int kNg = 2;  // states per barrier of the dB/dC reduction
constexpr int kWarps = kBlock / 32;
constexpr int kRed = kWarps * 32 * kItems;  // one state's per-warp dB/dC sums

// Per-warp reduction slot: lane l's item i at i * 32 + (l ^ 4i): conflict-free both when the 32
// lanes write one item and when 32 threads read 8 items of 4 lanes.
__device__ __forceinline__ int red_pos(int lane, int i) {
  return i * 32 + (lane ^ (4 * i));
}

template <typename T, bool kReset>
__global__ void __launch_bounds__(kBlock, 2) scan_bwd_kernel(const ScanParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = p.d_state;
  SmemCarver carve{smem_raw};
  T* act = carve.take<T>(4 * Tl::tile_elems<T>());  // u, delta, z, dy; then du, ddelta, dz
  float* bc = carve.take<float>(2 * kNs * Tl::kBcRow);
  float* hf = carve.take<float>(kC * N);  // forward state entering the chunk (saved)
  // Gradient reaching the state entering the chunk, double-buffered by chunk parity (lane 0
  // writes the earlier chunk's while the other lanes may still be reading this one's).
  float* qb = carve.take<float>(2 * kC * N);
  float* a2 = carve.take<float>(kC * N);    // A * log2(e)
  float* dA_s = carve.take<float>(kC * N);  // this block's dA
  float* red = carve.take<float>(2 * kNg * kRed);
  int* seq = carve.take<int>(kL + 1);
  const Place q = place(p);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t bcn = static_cast<int64_t>(q.b) * p.channels;
  const int chunks = (p.seqlen + kL - 1) / kL, padded = chunks * kL;
  for (int i = tid; i < kC * N; i += kBlock) {
    const int ch = i / N, n = i % N, c = q.c0 + ch;
    const bool ok = ch < q.nch;
    a2[i] = ok ? p.A[static_cast<int64_t>(c) * N + n] * kLog2e : 0.f;
    qb[((chunks - 1) & 1) * kC * N + i] =
        ok && p.dfinal_state ? p.dfinal_state[(bcn + c) * N + n] : 0.f;
    dA_s[i] = 0.f;
  }
  const float d_skip = q.active && p.D ? p.D[q.c] : 0.f;
  const float bias = q.active && p.delta_bias ? p.delta_bias[q.c] : 0.f;
  const unsigned mask = 0xffffffffu;
  T* const t_u = act;
  T* const t_delta = act + Tl::tile_elems<T>();
  T* const t_z = act + 2 * Tl::tile_elems<T>();
  T* const t_dy = act + 3 * Tl::tile_elems<T>();
  float dD_acc = 0.f, ddb_acc = 0.f;
  int parity = 0;
  for (int k = chunks - 1; k >= 0; --k) {
    const int t0 = k * kL;
    Tl::load(p, q, static_cast<const T*>(p.u), t0, t_u);
    Tl::load(p, q, static_cast<const T*>(p.delta), t0, t_delta);
    if (p.z) Tl::load(p, q, static_cast<const T*>(p.z), t0, t_z);
    Tl::load(p, q, static_cast<const T*>(p.dy), t0, t_dy);
    if (kReset) Tl::load_seq(p, q, t0, seq);
    if (N <= kNs) Tl::load_bc<T>(p, q, t0, 0, bc);
    {
      const float* src =
          p.chunk_states + ((static_cast<int64_t>(q.b) * chunks + k) * p.channels + q.c0) * N;
      for (int i = tid; i < kC * N; i += kBlock) hf[i] = i < q.nch * N ? src[i] : 0.f;
    }
    __syncthreads();
    float dt[kItems], dtu[kItems], dout[kItems], out[kItems], s1[kItems], ddtA[kItems];
    bool reset[kItems];
    float dtsum = 0.f;
    {
      float uv[kItems];
      Tl::read_items(t_delta, q, dt);
      Tl::read_items(t_u, q, uv);
      Tl::read_items(t_dy, q, dout);  // 0 past the end (zero-filled tile)
      if (p.z) {
        float zv[kItems];
        Tl::read_items(t_z, q, zv);
#pragma unroll
        for (int i = 0; i < kItems; ++i) dout[i] *= zv[i] * sigmoid(zv[i]);
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int r = q.seg * kItems + i;
        const bool valid = t0 + r < p.seqlen;
        float d = dt[i] + bias;
        if (p.delta_softplus) d = softplus(d);
        dt[i] = valid ? d : 0.f;
        dtu[i] = dt[i] * uv[i];
        out[i] = s1[i] = ddtA[i] = 0.f;
        dtsum += dt[i];
        reset[i] = kReset && Tl::is_reset(p, seq, t0, r);
      }
    }
    for (int s0 = 0; s0 < N; s0 += kNs) {
      if (N > kNs) {
        __syncthreads();
        Tl::load_bc<T>(p, q, t0, s0, bc);
        __syncthreads();
      }
      const int ns = min(kNs, N - s0);
      const float* a2_row = a2 + q.ch * N + s0;
      const float* hf_row = hf + q.ch * N + s0;
      const float* qb_row = qb + (k & 1) * kC * N + q.ch * N + s0;
      float* qb_prev = qb + ((k + 1) & 1) * kC * N + q.ch * N + s0;  // chunk k - 1's
      float* dA_row = dA_s + q.ch * N + s0;
      const float* A_row = p.A + static_cast<int64_t>(q.active ? q.c : 0) * N + s0;
#pragma unroll 1
      for (int nn = 0; nn < ns; ++nn) {
        const float a2n = a2_row[nn];
        const float an = q.active ? __ldg(A_row + nn) : 0.f;
        const float h_carry = hf_row[nn], q_carry = qb_row[nn];
        float bv[kItems], cv[kItems], a[kItems];
        Tl::read_bc(bc + nn * Tl::kBcRow, q.seg, bv);
        Tl::read_bc(bc + (kNs + nn) * Tl::kBcRow, q.seg, cv);
        float A = 1.f, H = 0.f, Q = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          a[i] = ex2(dt[i] * a2n);
          if (kReset) {
            if (reset[i]) a[i] = 0.f;
            H = (reset[i] ? 0.f : a[i] * H) + dtu[i] * bv[i];
            A = reset[i] ? 0.f : a[i] * A;
          } else {
            H = a[i] * H + dtu[i] * bv[i];
          }
        }
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const float g = dout[i] * cv[i] + Q;
          Q = kReset && reset[i] ? 0.f : a[i] * g;
        }
        if (!kReset) A = ex2(dtsum * a2n);
        float h = scan_up<kReset>(A, H, h_carry, q.seg);     // state entering this thread's steps
        float qq = scan_down<kReset>(A, Q, q_carry, q.seg);  // gradient arriving after its steps
        float ah[kItems];                                    // a_t h_t-1
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          ah[i] = kReset && reset[i] ? 0.f : a[i] * h;
          h = ah[i] + dtu[i] * bv[i];
          out[i] += cv[i] * h;
        }
        float dA_acc = 0.f;
        float* slot = red + ((parity * kNg + nn % kNg) * kWarps + warp) * (32 * kItems);
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const float g = dout[i] * cv[i] + qq;
          qq = kReset && reset[i] ? 0.f : a[i] * g;
          const float pa = g * ah[i];
          s1[i] += g * bv[i];
          ddtA[i] += pa * an;
          dA_acc += pa * dt[i];
          // dB (lanes 0-15 keep it) and dC (lanes 16-31) summed over the warp's two channels.
          const float db = g * dtu[i], dc = dout[i] * (ah[i] + dtu[i] * bv[i]);
          const bool lo = lane < 16;
          const float keep = lo ? db : dc, send = lo ? dc : db;
          slot[red_pos(lane, i)] = keep + __shfl_xor_sync(mask, send, 16);
        }
        if (q.seg == 0) qb_prev[nn] = qq;
#pragma unroll
        for (int off = kTpc / 2; off >= 1; off /= 2)
          dA_acc += __shfl_xor_sync(mask, dA_acc, off, kTpc);
        if (q.seg == 0) dA_row[nn] += dA_acc;
        if (nn % kNg == kNg - 1 || nn == ns - 1) {
          // Sum the warps' slots of the last kNg states in warp order; thread (quantity, step).
          __syncthreads();
          const int qn = tid / kL, step = tid % kL, l = qn * 16 + step / kItems, it = step % kItems;
          const int first = nn - nn % kNg;
          for (int j = 0; j <= nn - first; ++j) {
            const float* s = red + (parity * kNg + j) * kWarps * (32 * kItems);
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) sum += s[w * 32 * kItems + red_pos(l, it)];
            p.partial_bc[(((static_cast<int64_t>(qn) * p.batch + q.b) * gridDim.x + blockIdx.x) *
                              N +
                          s0 + first + j) *
                             padded +
                         t0 + step] = sum;
          }
          parity ^= 1;
        }
      }
    }
    // Per step: dz, du, ddelta into the u/delta/z tiles (each thread rewrites only its own steps,
    // which only it read); dD and ddelta_bias accumulate.
    {
      float uv[kItems], raw[kItems], dyv[kItems], du[kItems];
      Tl::read_items(t_u, q, uv);
      Tl::read_items(t_delta, q, raw);
      Tl::read_items(t_dy, q, dyv);
      if (p.z) {
        float zv[kItems];
        Tl::read_items(t_z, q, zv);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const float sz = sigmoid(zv[i]);
          zv[i] = dyv[i] * (out[i] + d_skip * uv[i]) * sz * (1.f + zv[i] * (1.f - sz));
        }
        Tl::write_items(t_z, q, zv);
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool valid = t0 + q.seg * kItems + i < p.seqlen;
        const float ddt = ddtA[i] + uv[i] * s1[i];
        raw[i] = valid ? (p.delta_softplus ? ddt * sigmoid(raw[i] + bias) : ddt) : 0.f;
        du[i] = dt[i] * s1[i] + d_skip * dout[i];
        dD_acc += dout[i] * uv[i];
        ddb_acc += raw[i];
      }
      Tl::write_items(t_u, q, du);
      Tl::write_items(t_delta, q, raw);
    }
    __syncthreads();
    Tl::store(p, q, t_u, t0, static_cast<T*>(p.du));
    Tl::store(p, q, t_delta, t0, static_cast<T*>(p.ddelta));
    if (p.z) Tl::store(p, q, t_z, t0, static_cast<T*>(p.dz));
    __syncthreads();  // the tiles are refilled by the next chunk
  }
#pragma unroll
  for (int off = kTpc / 2; off >= 1; off /= 2) {
    dD_acc += __shfl_xor_sync(mask, dD_acc, off, kTpc);
    ddb_acc += __shfl_xor_sync(mask, ddb_acc, off, kTpc);
  }
  if (q.seg == 0 && q.active) {
    p.partial_d[bcn + q.c] = dD_acc;
    p.partial_d[static_cast<int64_t>(p.batch) * p.channels + bcn + q.c] = ddb_acc;
  }
  for (int i = tid; i < q.nch * N; i += kBlock) {
    p.partial_a[(bcn + q.c0) * N + i] = dA_s[i];
    if (p.dinitial_state) p.dinitial_state[(bcn + q.c0) * N + i] = qb[kC * N + i];  // chunk -1
  }
}

// dB, dC [B,T,G,N] = the sums of the group's per-block partials, in block order.
template <typename T>
__global__ void scan_bwd_finish_bc(const ScanParams p, int per_group, int padded) {
  const int64_t total = 2ll * p.batch * p.groups * p.d_state * p.seqlen;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int t = static_cast<int>(i % p.seqlen);
  int64_t rest = i / p.seqlen;
  const int n = static_cast<int>(rest % p.d_state);
  rest /= p.d_state;
  const int g = static_cast<int>(rest % p.groups);
  rest /= p.groups;
  const int b = static_cast<int>(rest % p.batch);
  const int qn = static_cast<int>(rest / p.batch);
  const int nblk = p.groups * per_group;
  float sum = 0.f;
  for (int j = 0; j < per_group; ++j)
    sum += p.partial_bc[(((static_cast<int64_t>(qn) * p.batch + b) * nblk + g * per_group + j) *
                             p.d_state +
                         n) *
                            padded +
                        t];
  T* dst = static_cast<T*>(qn == 0 ? p.dB : p.dC);
  dst[((static_cast<int64_t>(b) * p.seqlen + t) * p.groups + g) * p.d_state + n] =
      from_float<T>(sum);
}

// dA, dD, ddelta_bias += the sums of the batch rows' partials, in row order.
__global__ void scan_bwd_finish_small(const ScanParams p) {
  const int64_t cn = static_cast<int64_t>(p.channels) * p.d_state;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < cn) {
    float sum = 0.f;
    for (int b = 0; b < p.batch; ++b) sum += p.partial_a[b * cn + i];
    p.dA[i] += sum;
  }
  if (i < p.channels) {
    float sd = 0.f, sb = 0.f;
    for (int b = 0; b < p.batch; ++b) {
      sd += p.partial_d[static_cast<int64_t>(b) * p.channels + i];
      sb += p.partial_d[static_cast<int64_t>(p.batch + b) * p.channels + i];
    }
    if (p.dD) p.dD[i] += sd;
    if (p.ddelta_bias) p.ddelta_bias[i] += sb;
  }
}

template <typename T>
size_t bwd_smem(int n) {
  SmemCarver carve{nullptr};
  carve.take<T>(4 * Tl::tile_elems<T>());
  carve.take<float>(2 * kNs * Tl::kBcRow);
  carve.take<float>(5 * kC * n);
  carve.take<float>(2 * kNg * kRed);
  carve.take<int>(kL + 1);
  return carve.used;
}

template <typename T, bool kReset>
void launch(const ScanParams& p, cudaStream_t stream) {
  const size_t smem = bwd_smem<T>(p.d_state);
  CUDA_CHECK(cudaFuncSetAttribute(scan_bwd_kernel<T, kReset>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  scan_bwd_kernel<T, kReset><<<scan_grid(p), kBlock, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  const int64_t total = 2ll * p.batch * p.groups * p.d_state * p.seqlen;
  const int padded = (p.seqlen + kL - 1) / kL * kL;
  const int per_group = static_cast<int>(scan_grid(p).x) / p.groups;
  scan_bwd_finish_bc<T>
      <<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(p, per_group, padded);
  CUDA_CHECK(cudaGetLastError());
  const int64_t small = static_cast<int64_t>(p.channels) * p.d_state;
  scan_bwd_finish_small<<<static_cast<unsigned>((small + 255) / 256), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void selective_scan_bwd_cuda(const ScanParams& p, void* stream) {
  dispatch_scan(p, [&](auto t, auto reset) {
    launch<decltype(t), decltype(reset)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace braid
