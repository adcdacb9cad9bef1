// Shared pieces of the SSD kernels (CUDA sources only): 64-token tiles staged in shared memory
// by cp.async, the per-token scalars of a tile, and block-wide sums and scans. The tile products
// use the warp-level fragments of layers/common/cuda_mma.cuh.
//
// Every product kernel runs kThreads = 128 threads: warp w owns rows [16 w, 16 w + 16) of a
// 64-row output tile. Shared-memory tiles are row-major with rows padded by kPad elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/common/cuda_mma.cuh"
#include "layers/ssd/ssd_cuda.h"

namespace braid::ssd {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;
constexpr int kRows = kSsdBlock;  // 64 rows per tile, 16 per warp
constexpr int kPad = 8;

__device__ __forceinline__ int warp_row0() {
  return (threadIdx.x >> 5) * 16;
}

// Stages rows [0, rows) x columns [0, W) into a padded shared tile (load_rows).
template <int W>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int64_t gs, int rows, int valid) {
  static_assert(kPad == 8, "load_rows pads rows by 8 elements");
  load_rows<W, kThreads>(s, g, gs, rows, valid);
}

// The scalars of one 64-token tile of a (b, h) lane: a (the chunk's cumulative dt A), dt and the
// document id (the tokens past the end repeat the last token's); w: a kernel's per-token weight.
struct TokenInfo {
  float a[kRows];
  float dt[kRows];
  int doc[kRows];
  float w[kRows];
};
__device__ __forceinline__ int doc_at(const SsdParams& p, int b, int64_t t) {
  if (!p.seq_idx) return 0;
  return p.seq_idx[int64_t(b) * p.seqlen + (t < p.seqlen ? t : p.seqlen - 1)];
}
// Fills `info` for tokens t0 .. t0 + 63 (t0 = chunk start + tile offset); call with all threads,
// then synchronise.
__device__ __forceinline__ void load_info(TokenInfo& info, const SsdParams& p, int b, int h,
                                          int64_t t0) {
  const int i = threadIdx.x;
  if (i < kRows) {
    const int64_t lane = (int64_t(b) * p.heads + h) * p.geo.tpad + t0 + i;
    info.a[i] = p.ws[p.geo.acs + lane];
    info.dt[i] = p.ws[p.geo.dt + lane];
    info.doc[i] = doc_at(p, b, t0 + i);
  }
}

// The weights of dB (kDB) and dC's score tiles u = L_r . R_s (rows r: this thread's r0, r0 + 8 in
// the 16-row fragment layout; columns s), about a reference token of tile r (dB: its last, dC:
// its first). Off the diagonal tile they factor as w_rs = f_r c_s (ssd_bwd.cu), both exponents
// <= 0:
//   dB (row j, column i >= j): f_j = [doc_j = doc_ref] e^(a_ref - a_j) dt_j,
//                              c_i = [doc_i = doc_ref] e^(a_i - a_ref);
//   dC (row i, column j <= i): f_i = [doc_i = doc_ref] e^(a_i - a_ref),
//                              c_j = [doc_j = doc_ref] e^(a_ref - a_j) dt_j;
// on it each element is weighed whole (the causal mask, documents, e^(a_i - a_j), dt_j).
template <bool kDB>
__device__ __forceinline__ void dbc_row_factors(float (&fr)[2], const TokenInfo& ri, int doc_ref,
                                                float a_ref, int r0) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + half * 8;
    fr[half] = ri.doc[row] != doc_ref ? 0.f
               : kDB                  ? ex2((a_ref - ri.a[row]) * kLog2e) * ri.dt[row]
                                      : ex2((ri.a[row] - a_ref) * kLog2e);
  }
}
// c into si.w, from threads 0-63 (the caller synchronises before reading it).
template <bool kDB>
__device__ __forceinline__ void dbc_column_factors(TokenInfo& si, int doc_ref, float a_ref) {
  if (threadIdx.x < kRows) {
    const int i = threadIdx.x;
    si.w[i] = si.doc[i] != doc_ref ? 0.f
              : kDB                ? ex2((si.a[i] - a_ref) * kLog2e)
                                   : ex2((a_ref - si.a[i]) * kLog2e) * si.dt[i];
  }
}
template <bool kDB>
__device__ __forceinline__ void dbc_weigh(float (&u)[8][4], const float (&fr)[2],
                                          const TokenInfo& ri, const TokenInfo& si, int r0,
                                          bool diagonal) {
  const int l = threadIdx.x & 31;
  if (!diagonal) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col = nt * 8 + 2 * (l & 3);
      const float c0w = si.w[col], c1w = si.w[col + 1];
      u[nt][0] *= fr[0] * c0w, u[nt][1] *= fr[0] * c1w;
      u[nt][2] *= fr[1] * c0w, u[nt][3] *= fr[1] * c1w;
    }
    return;
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = r0 + (e >> 1) * 8, col = nt * 8 + 2 * (l & 3) + (e & 1);
      float w = 0.f;
      if (ri.doc[row] == si.doc[col]) {
        if (kDB && col >= row)  // row j, column i
          w = ex2((si.a[col] - ri.a[row]) * kLog2e) * ri.dt[row];
        if (!kDB && col <= row)  // row i, column j
          w = ex2((ri.a[row] - si.a[col]) * kLog2e) * si.dt[col];
      }
      u[nt][e] *= w;
    }
}

// The block of dB (kDB) or dC (dbc_kernel, ssd_bwd.cu; its Hopper twin, ssd_bwd_hopper.cu): the
// 64-token tile r = rb of chunk c, NB states from n0, summed over a split of the heads of group
// g. The tiles of one (chunk, group, split) are adjacent blocks: they run together and share their
// partner tiles through L2. Products: L = x, R = dy, V = C, S = dS_c+1 for dB; L = dy, R = x,
// V = B, S = S_c for dC; partners s from rb to the chunk's end (dB) or from its start to rb (dC).
template <bool kDB>
struct DbcBlock {
  int b, g, c, rb, n0, split, valid_r, nvb, s_begin, s_end, doc_last, doc_state, ref, doc_ref;
  int h_begin, h_end;
  int64_t c0, tr, last, x_stride, bc_stride;
  bool has_state, empty;
  const SsdParams& p;
  __device__ __forceinline__ DbcBlock(const SsdParams& params, int nb) : p(params) {
    const int N = p.d_state, G = p.groups, hpg = p.heads / G;
    const int per_cg = p.chunk / kRows * (N / nb), ty = blockIdx.x % per_cg;
    split = (blockIdx.x / per_cg) % p.geo.splits;
    const int cg = blockIdx.x / per_cg / p.geo.splits;
    g = cg % G, c = cg / G, b = blockIdx.y;
    rb = ty / (N / nb), n0 = (ty % (N / nb)) * nb;
    c0 = int64_t(c) * p.chunk, tr = c0 + rb * kRows;
    empty = tr >= p.seqlen;
    valid_r = int(min(int64_t(kRows), p.seqlen - tr));
    last = min(c0 + p.chunk, int64_t(p.seqlen)) - 1;
    nvb = int((last - c0) / kRows) + 1;
    s_begin = kDB ? rb : 0, s_end = kDB ? nvb : rb + 1;
    doc_last = doc_at(p, b, last), doc_state = doc_at(p, b, c == 0 ? 0 : c0 - 1);
    has_state = kDB || c > 0 || p.initial_state;
    x_stride = int64_t(p.heads) * p.head_dim, bc_stride = int64_t(G) * N;
    h_begin = g * hpg + split * int(p.geo.heads_per_split);
    h_end = min(h_begin + int(p.geo.heads_per_split), (g + 1) * hpg);
    ref = kDB ? valid_r - 1 : 0, doc_ref = doc_at(p, b, tr + ref);
  }
  // V's rows from token ts (NB states from n0).
  __device__ __forceinline__ const bf16* v_rows(int64_t ts) const {
    return static_cast<const bf16*>(kDB ? p.C : p.B) +
           ((int64_t(b) * p.seqlen + ts) * p.groups + g) * p.d_state + n0;
  }
};
// Head h of a DbcBlock: L's rows of tile r, S (its NB columns), R's rows from a token, a_ref and
// the a of the chunk's last token.
template <bool kDB>
struct DbcHead {
  const bf16 *l_rows, *state, *r_base;
  float a_ref, a_last;
  int64_t x_stride;
  __device__ __forceinline__ DbcHead(const SsdParams& p, const DbcBlock<kDB>& k, int h) {
    const int64_t row0 = int64_t(k.b) * p.seqlen, lane = (int64_t(k.b) * p.heads + h) * p.geo.tpad;
    x_stride = k.x_stride;
    l_rows =
        static_cast<const bf16*>(kDB ? p.x : p.dy) + ((row0 + k.tr) * p.heads + h) * p.head_dim;
    r_base = static_cast<const bf16*>(kDB ? p.dy : p.x) + (row0 * p.heads + h) * p.head_dim;
    state = reinterpret_cast<const bf16*>(kDB ? p.scratch + p.geo.dstates : p.ws + p.geo.states) +
            ((int64_t(k.b) * p.geo.chunks + k.c) * p.heads + h) * p.head_dim * p.d_state + k.n0;
    a_ref = p.ws[p.geo.acs + lane + k.tr + k.ref];
    a_last = p.ws[p.geo.acs + lane + k.last];
  }
  __device__ __forceinline__ const bf16* r_rows(int64_t ts) const { return r_base + ts * x_stride; }
};
// The state term's row factors (rows r0, r0 + 8 of tile r): dB: dt_j u_j = [doc_j = doc_L]
// e^(a_L - a_j) dt_j; dC: v_i = [doc_i = doc of S_c] e^(a_i).
template <bool kDB>
__device__ __forceinline__ void dbc_state_factors(float (&f)[2], const DbcBlock<kDB>& k,
                                                  const DbcHead<kDB>& hd, const TokenInfo& ri,
                                                  int r0) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + half * 8;
    f[half] =
        kDB ? (ri.doc[row] == k.doc_last ? ex2((hd.a_last - ri.a[row]) * kLog2e) * ri.dt[row] : 0.f)
            : (ri.doc[row] == k.doc_state ? ex2(ri.a[row] * kLog2e) : 0.f);
  }
}
// The block's sums into the dB or dC partial sums of its split.
template <int NB, bool kDB>
__device__ __forceinline__ void dbc_store(const SsdParams& p, const DbcBlock<kDB>& k,
                                          const float (&acc)[NB / 8][4]) {
  const int G = p.groups, N = p.d_state, l = threadIdx.x & 31;
  const int r0 = (threadIdx.x >> 5) * 16 + (l >> 2);
  float* out = p.scratch + p.geo.dbc + (kDB ? 0 : p.geo.splits * p.batch * p.geo.tpad * G * N) +
               ((int64_t(k.split) * p.batch + k.b) * p.geo.tpad + k.tr) * G * N + int64_t(k.g) * N +
               k.n0;
#pragma unroll
  for (int nt = 0; nt < NB / 8; ++nt) {
    const int col = nt * 8 + 2 * (l & 3);
    *reinterpret_cast<float2*>(out + int64_t(r0) * G * N + col) =
        make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2*>(out + int64_t(r0 + 8) * G * N + col) =
        make_float2(acc[nt][2], acc[nt][3]);
  }
}

// Block-wide (blockDim.x threads, a multiple of 32, at most 1024) sum and inclusive scans, in a
// fixed order; `sh` holds blockDim.x floats. Every thread must call them.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) s += sh[w];
  return s;
}
template <bool kReverse>
__device__ __forceinline__ float block_scan(float v, float* sh) {
  const int i = threadIdx.x, n = blockDim.x;
  __syncthreads();
  sh[i] = v;
  __syncthreads();
  for (int off = 1; off < n; off *= 2) {
    const int j = kReverse ? i + off : i - off;
    const float o = (j >= 0 && j < n) ? sh[j] : 0.f;
    __syncthreads();
    sh[i] += o;
    __syncthreads();
  }
  return sh[i];
}

// Kernels that the forward and the backward share (ssd_fwd.cu): the chunk's own state term (the
// backward: its state gradient), the pass over the chunks (forward or reverse) and the tile
// products of the chunk scan: y (forward), dy_i . (y_i - D x_i) (backward: r) or dx (backward).
enum class ScanMode { y, r, dx };
void launch_chunk_state(const SsdParams& p, bool grad, cudaStream_t stream);
void launch_state_pass(const SsdParams& p, bool grad, cudaStream_t stream);
void launch_chunk_scan(const SsdParams& p, ScanMode mode, cudaStream_t stream);
// Whether the fused Hopper kernels run (p.hopper, an sm_90 device, d_state 64 or 128), and
// those kernels: the forward after prep (ssd_fwd_hopper.cu), the backward's state gradient and
// dx (ssd_bwd_hopper.cu), each with the tiles' scores first.
bool use_hopper(const SsdParams& p);
void launch_fused_fwd(const SsdParams& p, cudaStream_t stream);
void launch_fused_bwd(const SsdParams& p, cudaStream_t stream);
// dB and dC's partial sums on wgmma (ssd_bwd_hopper.cu; dbc_kernel's products).
void launch_dbc_hopper(const SsdParams& p, cudaStream_t stream);

}  // namespace braid::ssd
