// SSD forward on the GPU: the chunked algorithm in four kernels (the notation of ssd_cuda.h); on
// sm_90 kernels 2-4 give way to the fused kernel of ssd_fwd_hopper.cu.
//   1. prep, per (chunk, head, batch row): dt = clamp(softplus(dt_raw + bias)) and a_i, the
//      cumulative sum of dt A over the chunk (a block scan), saved for the backward; and each
//      token's document.
//   2. chunk_state, per (chunk, head, 64 x 128 tile of [P,N]): the chunk's own state term
//      sum_j w_j x_j B_j^T (w_j = [doc_j = doc_L] e^(a_L - a_j) dt_j) as one tensor-core product
//      (X diag(w))^T B with K = Q, the token tiles double-buffered by cp.async and the weights
//      applied to the A operand in registers (rounded to bf16 as the product's operand).
//   3. state_pass, per (head, batch row, 1024 elements of the state): S_c+1 = keep_c S_c + term,
//      in f32 over the chunks in order; S_c is stored in bf16 (the next kernel's operand).
//   4. chunk_scan, per (chunk, 64-token tile i, group, split of the group's heads): the score
//      tiles C_i B_j^T (j <= i, K = N) made once for the block's heads and kept in shared memory;
//      per head the state term e^(a_i) C_i S_c^T (K = N, S_c streamed in 64-column slices), then
//      every score tile weighted by the head's e^(a_i - a_j) dt_j (and the causal and document
//      masks) in registers and multiplied by x_j (K = 64): the weight factors into a column
//      weight (applied to the score tile) and a row factor (applied once to the accumulator),
//      off the diagonal always and on it where the tile holds one document and a bounded decay
//      span (else the diagonal tile weighs element by element); sub-tiles past the causal edge
//      are skipped; D x_i is added and y written (and, when asked, y - D x). The
//      same kernel gives the backward dy_i . (y_i - D x_i) (when the forward's y_scan is not
//      at hand) and dx (ssd_bwd.cu).
// FLOPs per (chunk, head): 2 Q P N (chunk_state) + 2 Q N P (state term) + Q^2 P (the causal half
// of the tile products, the diagonal tiles computed whole) + Q^2 N per (chunk, group) for the
// scores.
#include <cuda_runtime.h>

#include "layers/ssd/ssd_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace ssd {

namespace {

__global__ void prep_kernel(SsdParams p) {
  __shared__ float sh[256];
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int64_t t = int64_t(c) * p.chunk + threadIdx.x;
  float dt = 0.f;
  if (t < p.seqlen) {
    const float raw =
        p.dt[(int64_t(b) * p.seqlen + t) * p.heads + h] + (p.dt_bias ? p.dt_bias[h] : 0.f);
    dt = fminf(fmaxf(p.dt_softplus ? softplus(raw) : raw, p.dt_min), p.dt_max);
  }
  const float a = block_scan<false>(dt * p.A[h], sh);
  const int64_t lane = (int64_t(b) * p.heads + h) * p.geo.tpad + t;
  p.ws[p.geo.dt + lane] = dt;
  p.ws[p.geo.acs + lane] = a;
  if (h == 0)
    reinterpret_cast<int*>(p.ws + p.geo.docs)[int64_t(b) * p.geo.tpad + t] = doc_at(p, b, t);
}

template <int NB, bool kGrad>
__global__ __launch_bounds__(kThreads) void chunk_state_kernel(SsdParams p) {
  constexpr int ldu = 64 + kPad, ldv = NB + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* us = reinterpret_cast<bf16*>(smem);                   // 2 x [64 tokens][64 p]
  bf16* vs = us + 2 * kRows * ldu;                            // 2 x [64 tokens][NB n]
  float* w = reinterpret_cast<float*>(vs + 2 * kRows * ldv);  // 2 x [64]
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int P = p.head_dim, N = p.d_state, G = p.groups, g = h / (p.heads / G);
  const int p0 = (blockIdx.y / (N / NB)) * 64, n0 = (blockIdx.y % (N / NB)) * NB;
  const int64_t c0 = int64_t(c) * p.chunk;
  const int64_t last = min(c0 + p.chunk, int64_t(p.seqlen)) - 1;
  const int tiles = int((last - c0) / kRows) + 1;
  const int64_t lane_off = (int64_t(b) * p.heads + h) * p.geo.tpad;
  const float a_last = p.ws[p.geo.acs + lane_off + last];
  // Forward: w_j = [doc_j = doc_L] e^(a_L - a_j) dt_j. Backward (with dy and C): the gradient
  // of S_c from the chunk's outputs, w_i = [doc_i = doc of S_c] e^(a_i).
  const int doc_ref = kGrad ? doc_at(p, b, c == 0 ? 0 : c0 - 1) : doc_at(p, b, last);
  const bf16* U = static_cast<const bf16*>(kGrad ? p.dy : p.x);
  const bf16* V = static_cast<const bf16*>(kGrad ? p.C : p.B);
  auto stage = [&](int k) {
    const int64_t t0 = c0 + k * kRows;
    const int valid = int(min(int64_t(kRows), last + 1 - t0));
    load_tile<64>(us + (k & 1) * kRows * ldu,
                  U + ((int64_t(b) * p.seqlen + t0) * p.heads + h) * P + p0, int64_t(p.heads) * P,
                  kRows, valid);
    load_tile<NB>(vs + (k & 1) * kRows * ldv, V + ((int64_t(b) * p.seqlen + t0) * G + g) * N + n0,
                  int64_t(G) * N, kRows, valid);
    cp_async_commit();
    if (threadIdx.x < kRows) {
      const int j = threadIdx.x;
      const int64_t t = t0 + j;
      const bool on = t <= last && doc_at(p, b, t) == doc_ref;
      const float a = p.ws[p.geo.acs + lane_off + t];
      w[(k & 1) * kRows + j] = !on     ? 0.f
                               : kGrad ? ex2(a * kLog2e)
                                       : ex2((a_last - a) * kLog2e) * p.ws[p.geo.dt + lane_off + t];
    }
  };
  float acc[NB / 8][4];
  zero(acc);
  const int l = lane_id();
  stage(0);
  for (int k = 0; k < tiles; ++k) {
    if (k + 1 < tiles) {
      stage(k + 1);
      cp_async_wait_pending<1>();
    } else {
      cp_async_wait();
    }
    __syncthreads();
    const bf16* ut = us + (k & 1) * kRows * ldu;
    const bf16* vt = vs + (k & 1) * kRows * ldv;
    const float* wt = w + (k & 1) * kRows;
    // acc += (X^T diag(w)) V: A = X^T (rows p, k = tokens), its columns weighted by w.
#pragma unroll
    for (int kk = 0; kk < kRows; kk += 16) {
      uint32_t af[4];
      load_a<false>(af, ut, ldu, warp_row0(), kk);
      const int j = kk + 2 * (l & 3);
      af[0] = scale_bf16x2(af[0], wt[j], wt[j + 1]), af[1] = scale_bf16x2(af[1], wt[j], wt[j + 1]);
      af[2] = scale_bf16x2(af[2], wt[j + 8], wt[j + 9]);
      af[3] = scale_bf16x2(af[3], wt[j + 8], wt[j + 9]);
#pragma unroll
      for (int nt = 0; nt < NB / 8; nt += 2) {
        uint32_t bf[4];
        load_b<false>(bf, vt, ldv, nt * 8, kk);
        mma16816(acc[nt], af, bf[0], bf[1]);
        mma16816(acc[nt + 1], af, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }
  float* out = p.scratch + p.geo.local + ((int64_t(b) * p.geo.chunks + c) * p.heads + h) * P * N;
  const int r = p0 + warp_row0() + (l >> 2);
#pragma unroll
  for (int nt = 0; nt < NB / 8; ++nt) {
    const int col = n0 + nt * 8 + 2 * (l & 3);
    *reinterpret_cast<float2*>(out + int64_t(r) * N + col) = make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2*>(out + int64_t(r + 8) * N + col) =
        make_float2(acc[nt][2], acc[nt][3]);
  }
}

__device__ __forceinline__ float chunk_keep(const SsdParams& p, int b, const float* acs, int c) {
  const int64_t c0 = int64_t(c) * p.chunk, last = min(c0 + p.chunk, int64_t(p.seqlen)) - 1;
  const int sd = doc_at(p, b, c == 0 ? 0 : c0 - 1);
  return doc_at(p, b, last) == sd ? ex2(acs[last] * kLog2e) : 0.f;
}
__device__ __forceinline__ float4 load4_bf16(const bf16* s) {
  const uint2 v = *reinterpret_cast<const uint2*>(s);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ void store4_bf16(bf16* d, float4 v) {
  *reinterpret_cast<uint2*>(d) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
}
// k v + l, where k = 0 drops v (a document boundary) whatever its value.
__device__ __forceinline__ float4 link4(float k, float4 v, float4 l) {
  if (k == 0.f) return l;
  return make_float4(k * v.x + l.x, k * v.y + l.y, k * v.z + l.z, k * v.w + l.w);
}

template <bool kGrad>
__global__ __launch_bounds__(256) void state_pass_kernel(SsdParams p) {
  __shared__ float sh[32];
  const int h = blockIdx.y, b = blockIdx.z, nc = int(p.geo.chunks);
  const int64_t pn = int64_t(p.head_dim) * p.d_state;
  const int64_t e = (int64_t(blockIdx.x) * 256 + threadIdx.x) * 4;
  const int64_t state_off = (int64_t(b) * p.heads + h) * pn + e;
  auto chunk_off = [&](int c) { return ((int64_t(b) * nc + c) * p.heads + h) * pn + e; };
  bf16* states = reinterpret_cast<bf16*>(p.ws + p.geo.states);
  const float* local = p.scratch + p.geo.local;
  const float* acs = p.ws + p.geo.acs + (int64_t(b) * p.heads + h) * p.geo.tpad;
  float* last = p.ws + p.geo.last + state_off;
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!kGrad) {
    float4 s =
        p.initial_state ? *reinterpret_cast<const float4*>(p.initial_state + state_off) : zero4;
    for (int c = 0; c < nc; ++c) {
      store4_bf16(states + chunk_off(c), s);
      s = link4(chunk_keep(p, b, acs, c), s,
                *reinterpret_cast<const float4*>(local + chunk_off(c)));
    }
    *reinterpret_cast<float4*>(last) = s;
    if (p.final_state) *reinterpret_cast<float4*>(p.final_state + state_off) = s;
  } else {
    // Backward: g = dL/dS_c+1 walks the chunks in reverse; kappa_c = <dS_c+1, S_c+1> is the
    // gradient of a_L through every term of S_c+1 (ssd_bwd.cu).
    bf16* dstates = reinterpret_cast<bf16*>(p.scratch + p.geo.dstates);
    float4 g =
        p.dfinal_state ? *reinterpret_cast<const float4*>(p.dfinal_state + state_off) : zero4;
    for (int c = nc - 1; c >= 0; --c) {
      store4_bf16(dstates + chunk_off(c), g);
      const float4 s =
          c + 1 < nc ? load4_bf16(states + chunk_off(c + 1)) : *reinterpret_cast<float4*>(last);
      const float kap = block_sum(g.x * s.x + g.y * s.y + g.z * s.z + g.w * s.w, sh);
      if (threadIdx.x == 0)
        p.scratch[p.geo.kappa + ((int64_t(b) * p.heads + h) * nc + c) * p.geo.pass_blocks +
                  blockIdx.x] = kap;
      g = link4(chunk_keep(p, b, acs, c), g,
                *reinterpret_cast<const float4*>(local + chunk_off(c)));
    }
    if (p.dinitial_state) *reinterpret_cast<float4*>(p.dinitial_state + state_off) = g;
  }
}

// The tile products of one 64-token tile ("self") against the tiles of its chunk ("partners"),
// for a split of the heads of one group. kY (forward) and kR: self = rows i, partners j <= i,
// score C_i B_j^T, state S_c; kDx: self = rows j, partners i >= j, score B_j C_i^T, state dS_c+1.
// The score tiles do not depend on the head: they are made once per block, kept in bf16 in
// shared memory, and each head weighs them in registers (its decays) on their way into the
// product with its partner tiles (x_j, or dy_i), which are double-buffered by cp.async.
template <int P, int N, ScanMode kMode>
__global__ __launch_bounds__(kThreads) void chunk_scan_kernel(SsdParams p) {
  constexpr bool kDx = kMode == ScanMode::dx;
  constexpr int ldn = N + kPad, ldp = P + kPad, ldq = 64 + kPad;
  constexpr int kBuf = kRows * ldn > 2 * kRows * ldp ? kRows * ldn : 2 * kRows * ldp;
  const int tiles_per_chunk = p.chunk / kRows;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sc = reinterpret_cast<bf16*>(smem);         // score tiles [tiles][64][ldq]
  bf16* self = sc + tiles_per_chunk * kRows * ldq;  // C_i (kDx: B_j) [64][ldn]
  bf16* st = self + kRows * ldn;                    // the head's state [P][ldn]
  bf16* buf = st + P * ldn;  // partner B/C [64][ldn] (prologue); partner tiles 2 x [64][ldp]
  TokenInfo* info = reinterpret_cast<TokenInfo*>(buf + kBuf);  // self, partner x 2
  const int T = p.seqlen, H = p.heads, G = p.groups, hpg = H / G;
  // The tiles of one (chunk, group, split) are adjacent blocks: they run together and read the
  // same x (dy) tiles and states, which L2 then serves once.
  const int ty = blockIdx.x % tiles_per_chunk, rest = blockIdx.x / tiles_per_chunk;
  const int split = rest % p.geo.splits, cg = rest / p.geo.splits;
  const int g = cg % G, c = cg / G, b = blockIdx.y;
  const int sb = kDx ? ty : tiles_per_chunk - 1 - ty;  // the longest first
  const int64_t c0 = int64_t(c) * p.chunk, ts = c0 + sb * kRows;
  if (ts >= T) return;
  const int valid_s = int(min(int64_t(kRows), T - ts));
  const int64_t last = min(c0 + p.chunk, int64_t(T)) - 1;
  const int nvb = int((last - c0) / kRows) + 1;
  const int first = kDx ? sb : 0, count = kDx ? nvb - sb : sb + 1;
  const int doc_state = doc_at(p, b, c == 0 ? 0 : c0 - 1), doc_last = doc_at(p, b, last);
  const int64_t x_stride = int64_t(H) * P, bc_stride = int64_t(G) * N;
  const bf16* self_src = static_cast<const bf16*>(kDx ? p.B : p.C);
  const bf16* partner_src = static_cast<const bf16*>(kDx ? p.C : p.B);
  auto bc_at = [&](const bf16* base, int64_t t) {
    return base + ((int64_t(b) * T + t) * G + g) * N;
  };
  auto x_at = [&](const void* base, int64_t t, int h) {
    return static_cast<const bf16*>(base) + ((int64_t(b) * T + t) * H + h) * P;
  };
  const int l = lane_id(), r0 = warp_row0() + (l >> 2);
  // Score tiles: self . partner^T, K = N.
  load_tile<N>(self, bc_at(self_src, ts), bc_stride, kRows, valid_s);
  cp_async_commit();
  for (int k = 0; k < count; ++k) {
    const int64_t tp = c0 + (first + k) * kRows;
    load_tile<N>(buf, bc_at(partner_src, tp), bc_stride, kRows, int(min(int64_t(kRows), T - tp)));
    cp_async_commit();
    cp_async_wait();
    __syncthreads();
    float s[8][4];
    zero(s);
    mma_ss<8, N, true, true>(s, self, ldn, warp_row0(), 0, buf, ldn, 0);
    bf16* out = sc + k * kRows * ldq;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col = nt * 8 + 2 * (l & 3);
      *reinterpret_cast<uint32_t*>(out + r0 * ldq + col) = pack_bf16(s[nt][0], s[nt][1]);
      *reinterpret_cast<uint32_t*>(out + (r0 + 8) * ldq + col) = pack_bf16(s[nt][2], s[nt][3]);
    }
    __syncthreads();
  }
  const bool has_state = kDx || c > 0 || p.initial_state;
  const bf16* states =
      reinterpret_cast<const bf16*>(kDx ? p.scratch + p.geo.dstates : p.ws + p.geo.states);
  const void* partner_x = kDx ? p.dy : p.x;
  auto xbuf = [&](int k) { return buf + (k & 1) * kRows * ldp; };
  const int h_begin = g * hpg + split * int(p.geo.heads_per_split);
  const int h_end = min(h_begin + int(p.geo.heads_per_split), (g + 1) * hpg);
  // Weights relative to a reference token of the self tile (kY, kR: its first; kDx: its last):
  // with documents non-decreasing, the weight of partner j for row i in another tile factors as
  //   kY, kR: [doc_j = doc_i] e^(a_i - a_j) dt_j = r_i c_j,  r_i = [doc_i = doc_ref] e^(a_i -
  //   a_ref),
  //           c_j = [doc_j = doc_ref] e^(a_ref - a_j) dt_j  (j before the tile: both exponents <=
  //           0),
  //   kDx:    [doc_i = doc_j] e^(a_i - a_j) = r_j c_i,  r_j = [doc_j = doc_ref] e^(a_ref - a_j),
  //           c_i = [doc_i = doc_ref] e^(a_i - a_ref)  (i after the tile),
  // and the state term's row factor is r times one scalar. So the partner tiles off the diagonal
  // scale their score columns by c (from shared memory), the accumulator's rows are scaled by r
  // once, and only the diagonal tile weighs each score element (with the causal and document
  // masks), after that scaling and with the sub-tiles past the diagonal skipped.
  const int ref = kDx ? valid_s - 1 : 0;
  const int doc_ref = doc_at(p, b, ts + ref);
  for (int h = h_begin; h < h_end; ++h) {
    const int64_t lane_off = (int64_t(b) * H + h) * p.geo.tpad;
    const float a_ref = p.ws[p.geo.acs + lane_off + ts + ref];
    // Partner order: the diagonal tile (kY, kR: the last partner; kDx: the first) goes last.
    auto partner = [&](int k) { return kDx ? first + (k + 1) % count : first + k; };
    auto stage = [&](int k) {
      const int64_t tp = c0 + partner(k) * kRows;
      load_tile<P>(xbuf(k), x_at(partner_x, tp, h), x_stride, kRows,
                   int(min(int64_t(kRows), T - tp)));
      cp_async_commit();
      TokenInfo& in = info[1 + (k & 1)];
      load_info(in, p, b, h, tp);
      if (threadIdx.x < kRows) {  // c, from this thread's own entries
        const int i = threadIdx.x;
        in.w[i] = in.doc[i] != doc_ref ? 0.f
                  : kDx                ? ex2((in.a[i] - a_ref) * kLog2e)
                                       : ex2((a_ref - in.a[i]) * kLog2e) * in.dt[i];
      }
    };
    if (has_state)
      load_tile<N>(st, states + ((int64_t(b) * p.geo.chunks + c) * H + h) * P * N, N, P, P);
    load_info(info[0], p, b, h, ts);
    stage(0);
    cp_async_wait();
    __syncthreads();
    const TokenInfo& ri = info[0];
    float acc[P / 8][4];
    zero(acc);
    if (has_state) {
      mma_ss<P / 8, N, true, true>(acc, self, ldn, warp_row0(), 0, st, ldn, 0);
      const float a_last = p.ws[p.geo.acs + lane_off + last];
      const float f = kDx ? (doc_ref == doc_last ? ex2((a_last - a_ref) * kLog2e) : 0.f)
                          : (doc_ref == doc_state ? ex2(a_ref * kLog2e) : 0.f);
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= f;
    }
    const int warp = threadIdx.x >> 5;
    // The diagonal tile factors too where the self tile holds one document and its decay span
    // |a_first - a_last| is at most 60: its column factors are then at most e^60 (exponents of
    // either sign), far inside f32 and bf16, and only the sub-tile on the causal edge needs a
    // mask; the rows' factor r is applied after it. Else r is applied before the diagonal tile,
    // whose weights are formed element by element.
    const bool factored =
        ri.doc[0] == ri.doc[kRows - 1] && fabsf(ri.a[0] - ri.a[kRows - 1]) <= 60.f;
    auto scale_rows = [&]() {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + half * 8;
        const float r = ri.doc[row] != doc_ref ? 0.f
                        : kDx                  ? ex2((a_ref - ri.a[row]) * kLog2e)
                                               : ex2((ri.a[row] - a_ref) * kLog2e);
#pragma unroll
        for (int nt = 0; nt < P / 8; ++nt) acc[nt][2 * half] *= r, acc[nt][2 * half + 1] *= r;
      }
    };
    for (int k = 0; k < count; ++k) {
      if (k + 1 < count) {
        stage(k + 1);
        cp_async_wait_pending<1>();
      } else {
        cp_async_wait();
      }
      __syncthreads();
      const TokenInfo& pi = info[1 + (k & 1)];
      const bool diag = k == count - 1, exact = diag && !factored;
      const bf16* tile = sc + (partner(k) - first) * kRows * ldq;
      if (exact) scale_rows();  // for everything accumulated so far
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        // Diagonal sub-tiles past the causal edge (all weights zero) are skipped (warp-uniform).
        if (diag && (kDx ? kt < warp : kt > warp)) continue;
        uint32_t af[4];
        load_a<true>(af, tile, ldq, warp_row0(), kt * 16);
        const int cb = kt * 16 + 2 * (l & 3);  // this thread's columns cb, cb + 1, cb + 8, cb + 9
        if (!exact) {
          float cw[4] = {pi.w[cb], pi.w[cb + 1], pi.w[cb + 8], pi.w[cb + 9]};
          if (diag && kt == warp) {  // the causal edge: rows r0 (half 0) and r0 + 8 (half 1)
            float m[2][4];
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int row = r0 + half * 8, col = cb + (e & 1) + (e >> 1) * 8;
                m[half][e] = (kDx ? col >= row : col <= row) ? cw[e] : 0.f;
              }
            af[0] = scale_bf16x2(af[0], m[0][0], m[0][1]);
            af[1] = scale_bf16x2(af[1], m[1][0], m[1][1]);
            af[2] = scale_bf16x2(af[2], m[0][2], m[0][3]);
            af[3] = scale_bf16x2(af[3], m[1][2], m[1][3]);
          } else {
            af[0] = scale_bf16x2(af[0], cw[0], cw[1]);
            af[1] = scale_bf16x2(af[1], cw[0], cw[1]);
            af[2] = scale_bf16x2(af[2], cw[2], cw[3]);
            af[3] = scale_bf16x2(af[3], cw[2], cw[3]);
          }
        } else {
          // The head's weights of the score elements (rows r0, r0 + 8; columns cb, cb + 1,
          // cb + 8, cb + 9): causal mask and documents, e^(a_i - a_j), dt_j (kY, kR).
          float wv[2][4];
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = r0 + half * 8, col = cb + (e & 1) + (e >> 1) * 8;
              float w = 0.f;
              if (ri.doc[row] == pi.doc[col]) {
                if (kDx && col >= row) w = ex2((pi.a[col] - ri.a[row]) * kLog2e);
                if (!kDx && col <= row) w = ex2((ri.a[row] - pi.a[col]) * kLog2e) * pi.dt[col];
              }
              wv[half][e] = w;
            }
          af[0] = scale_bf16x2(af[0], wv[0][0], wv[0][1]);
          af[1] = scale_bf16x2(af[1], wv[1][0], wv[1][1]);
          af[2] = scale_bf16x2(af[2], wv[0][2], wv[0][3]);
          af[3] = scale_bf16x2(af[3], wv[1][2], wv[1][3]);
        }
#pragma unroll
        for (int nt = 0; nt < P / 8; nt += 2) {
          uint32_t bf[4];
          load_b<false>(bf, xbuf(k), ldp, nt * 8, kt * 16);
          mma16816(acc[nt], af, bf[0], bf[1]);
          mma16816(acc[nt + 1], af, bf[2], bf[3]);
        }
      }
      __syncthreads();
    }
    if (factored) scale_rows();
    if (kMode == ScanMode::y) {  // y = acc + D x (the last partner tile was x_i)
      const bf16* xs = xbuf(count - 1);
      bf16* y = static_cast<bf16*>(p.y) + ((int64_t(b) * T + ts) * H + h) * P;
      bf16* y_scan =
          p.y_scan ? static_cast<bf16*>(p.y_scan) + ((int64_t(b) * T + ts) * H + h) * P : nullptr;
      const float dh = p.D && !p.d_per_channel ? p.D[h] : 0.f;
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt) {
        const int col = nt * 8 + 2 * (l & 3);
        const float d0 = p.d_per_channel ? p.D[h * P + col] : dh,
                    d1 = p.d_per_channel ? p.D[h * P + col + 1] : dh;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = r0 + half * 8;
          if (row >= valid_s) continue;
          const float2 xv =
              __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + row * ldp + col));
          *reinterpret_cast<uint32_t*>(y + int64_t(row) * x_stride + col) =
              pack_bf16(acc[nt][2 * half] + d0 * xv.x, acc[nt][2 * half + 1] + d1 * xv.y);
          if (y_scan)
            *reinterpret_cast<uint32_t*>(y_scan + int64_t(row) * x_stride + col) =
                pack_bf16(acc[nt][2 * half], acc[nt][2 * half + 1]);
        }
      }
    } else if (kMode == ScanMode::r) {  // R_i = dy_i . (y_i - D x_i)
      const bf16* dys = xbuf(count);
      load_tile<P>(xbuf(count), x_at(p.dy, ts, h), x_stride, kRows, valid_s);
      cp_async_commit();
      cp_async_wait();
      __syncthreads();
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + half * 8;
        float v = 0.f;
#pragma unroll
        for (int nt = 0; nt < P / 8; ++nt) {
          const float2 d = __bfloat1622float2(
              *reinterpret_cast<const __nv_bfloat162*>(dys + row * ldp + nt * 8 + 2 * (l & 3)));
          v += d.x * acc[nt][2 * half] + d.y * acc[nt][2 * half + 1];
        }
        v = quad_sum(v);
        if ((l & 3) == 0) p.scratch[p.geo.r + lane_off + ts + row] = v;
      }
    } else {  // X'_j = acc: x_j . X'_j, dx_j = dt_j X'_j + D dy_j, the dD partial sums
      const bf16* xs = xbuf(0);
      const bf16* dys = xbuf(1);
      load_tile<P>(xbuf(0), x_at(p.x, ts, h), x_stride, kRows, valid_s);
      load_tile<P>(xbuf(1), x_at(p.dy, ts, h), x_stride, kRows, valid_s);
      cp_async_commit();
      cp_async_wait();
      __syncthreads();
      bf16* dx = static_cast<bf16*>(p.dx);
      float dd = 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + half * 8;
        const float dt = ri.dt[row];
        float v = 0.f;
#pragma unroll
        for (int nt = 0; nt < P / 8; ++nt) {
          const int col = nt * 8 + 2 * (l & 3);
          const float2 xv =
              __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + row * ldp + col));
          const float2 dyv =
              __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dys + row * ldp + col));
          const float a0 = acc[nt][2 * half], a1 = acc[nt][2 * half + 1];
          v += xv.x * a0 + xv.y * a1;
          dd += xv.x * dyv.x + xv.y * dyv.y;
          float d0 = 0.f, d1 = 0.f;
          if (p.D) {
            d0 = p.d_per_channel ? p.D[h * P + col] : p.D[h];
            d1 = p.d_per_channel ? p.D[h * P + col + 1] : p.D[h];
          }
          if (row < valid_s)
            *reinterpret_cast<uint32_t*>(dx + ((int64_t(b) * T + ts + row) * H + h) * P + col) =
                pack_bf16(dt * a0 + d0 * dyv.x, dt * a1 + d1 * dyv.y);
        }
        v = quad_sum(v);
        if ((l & 3) == 0) p.scratch[p.geo.delta + lane_off + ts + row] = v;
      }
      if (p.D) {
        const int64_t tile = int64_t(b) * (p.geo.tpad / kRows) + ts / kRows;
        float* part = p.scratch + p.geo.part_d + (tile * H + h) * p.geo.d_cols;
        if (!p.d_per_channel) {
          dd = block_sum(dd, reinterpret_cast<float*>(info + 1));
          if (threadIdx.x == 0) part[0] = dd;
        } else if (threadIdx.x < P) {
          const int col = threadIdx.x;
          float v = 0.f;
          for (int row = 0; row < kRows; ++row)
            v += __bfloat162float(xs[row * ldp + col]) * __bfloat162float(dys[row * ldp + col]);
          part[col] = v;
        }
      }
    }
    __syncthreads();
  }
}

template <int P, int N>
void launch_scan(const SsdParams& p, ScanMode mode, cudaStream_t stream) {
  constexpr int ldn = N + kPad, ldp = P + kPad;
  constexpr int kBuf = kRows * ldn > 2 * kRows * ldp ? kRows * ldn : 2 * kRows * ldp;
  const size_t smem =
      (size_t(p.chunk / kRows) * kRows * (64 + kPad) + kRows * ldn + P * ldn + kBuf) *
          sizeof(bf16) +
      3 * sizeof(TokenInfo);
  auto kernel = mode == ScanMode::y   ? chunk_scan_kernel<P, N, ScanMode::y>
                : mode == ScanMode::r ? chunk_scan_kernel<P, N, ScanMode::r>
                                      : chunk_scan_kernel<P, N, ScanMode::dx>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  const dim3 grid(unsigned(p.geo.chunks * p.groups * p.geo.splits * (p.chunk / kRows)),
                  unsigned(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_chunk_state(const SsdParams& p, bool grad, cudaStream_t stream) {
  const int nb = p.d_state < 128 ? p.d_state : 128;
  const dim3 grid(unsigned(p.geo.chunks * p.heads), unsigned(p.head_dim / 64 * p.d_state / nb),
                  unsigned(p.batch));
  auto launch = [&](auto kernel, int cols) {
    const size_t smem =
        2 * kRows * ((64 + kPad) + (cols + kPad)) * sizeof(bf16) + 2 * kRows * sizeof(float);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
  };
  if (nb == 64)
    launch(grad ? chunk_state_kernel<64, true> : chunk_state_kernel<64, false>, 64);
  else
    launch(grad ? chunk_state_kernel<128, true> : chunk_state_kernel<128, false>, 128);
  CUDA_CHECK(cudaGetLastError());
}

bool use_hopper(const SsdParams& p) {
  if (!p.hopper || p.d_state > 128) return false;
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
}

void launch_state_pass(const SsdParams& p, bool grad, cudaStream_t stream) {
  const dim3 grid(unsigned(p.geo.pass_blocks), unsigned(p.heads), unsigned(p.batch));
  if (grad)
    state_pass_kernel<true><<<grid, 256, 0, stream>>>(p);
  else
    state_pass_kernel<false><<<grid, 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

void launch_chunk_scan(const SsdParams& p, ScanMode mode, cudaStream_t stream) {
  const int key = p.head_dim * 1000 + p.d_state;
  switch (key) {
    case 64064:
      return launch_scan<64, 64>(p, mode, stream);
    case 64128:
      return launch_scan<64, 128>(p, mode, stream);
    case 64256:
      return launch_scan<64, 256>(p, mode, stream);
    case 128064:
      return launch_scan<128, 64>(p, mode, stream);
    case 128128:
      return launch_scan<128, 128>(p, mode, stream);
    case 128256:
      return launch_scan<128, 256>(p, mode, stream);
    default:
      BRAID_FAIL("ssd (CUDA): no kernel for head dim ", p.head_dim, ", d_state ", p.d_state);
  }
}

}  // namespace ssd

void ssd_state_grad_cuda(const SsdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  ssd::launch_chunk_state(p, true, stream);
  ssd::launch_state_pass(p, true, stream);
}

void ssd_fwd_cuda(const SsdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  ssd::prep_kernel<<<dim3(unsigned(p.geo.chunks * p.heads), 1, unsigned(p.batch)), p.chunk, 0,
                     stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  if (ssd::use_hopper(p)) return ssd::launch_fused_fwd(p, stream);
  ssd::launch_chunk_state(p, false, stream);
  ssd::launch_state_pass(p, false, stream);
  ssd::launch_chunk_scan(p, ssd::ScanMode::y, stream);
}

}  // namespace braid
