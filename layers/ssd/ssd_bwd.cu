// SSD backward on the GPU (the notation of ssd_cuda.h), from what the forward saved in the
// workspace (dt, a, S_c and the state after the last chunk), with no atomics: every sum runs in
// a fixed order, so the gradients are bit-identical from run to run.
//
// The gradients, per chunk and head (E_ij = [j <= i, doc_i = doc_j] e^(a_i - a_j), dS_c+1 the
// gradient of the state leaving the chunk, u_j = [doc_j = doc_L] e^(a_L - a_j),
// v_i = [doc_i = doc of S_c] e^(a_i)):
//   dS_c   = sum_i v_i dy_i C_i^T + keep_c dS_c+1                        (chunk_state, pass)
//   dx_j   = dt_j X'_j + D dy_j,  X'_j = u_j dS_c+1 B_j + sum_i (C_i . B_j) E_ij dy_i    (dx)
//   dB_j   = sum_heads [ dt_j u_j dS_c+1^T x_j + sum_i E_ij dt_j (x_j . dy_i) C_i ]      (dbc)
//   dC_i   = sum_heads [ v_i S_c^T dy_i + sum_j E_ij dt_j (dy_i . x_j) B_j ]            (dbc)
// and for the decays, with a_i the chunk's cumulative dt A: the derivative of the loss by a_i is
//   da_i = dy_i . (y_i - D x_i) - dt_i (x_i . X'_i) + [i = L] <dS_c+1, S_c+1>
// (the terms e^(a_i - a_j) give +score to a_i and -score to a_j; the row sums of the scores are
// dy_i . y_i's terms, their column sums x_j . dx_j's; the state leaving the chunk carries a_L in
// every term); then ddt_k = x_k . X'_k + A sum_{i >= k} da_i (a reverse scan in the chunk),
// dA = sum_k dt_k sum_{i >= k} da_i, and ddt_raw = ddt through the clamp and softplus.
//
// Kernels: chunk_scan again with dy (dy_i . (y_i - D x_i)); chunk_state with (dy, C) and the
// reverse state pass (dS_c+1 in bf16, <dS_c+1, S_c+1>, dinitial_state); dx (per 64-token tile
// j: the state term then the tiles i >= j, like the forward's scan transposed); dbc (dB and dC,
// per 64-token tile, 128 states and a split of the group's heads, summed over the heads in
// order); then the dt/dA pass per chunk and the fixed-order reductions of the partial sums.
#include <cuda_runtime.h>

#include "layers/ssd/ssd_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace ssd {
namespace {

template <int P, int N>
__global__ __launch_bounds__(kThreads) void dx_kernel(SsdParams p) {
  constexpr int ldn = N + kPad, ldp = P + kPad, lds = 64 + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* bs = reinterpret_cast<bf16*>(smem);  // B rows j         [64][ldn]
  bf16* cs = bs + kRows * ldn;               // C rows i         [64][ldn]
  bf16* ds = cs + kRows * ldn;               // dy rows i        [64][ldp]; at the end dy rows j
  bf16* ss = ds + kRows * ldp;               // dS_c+1 [P][64 columns]; at the end x rows j
  TokenInfo& rj = *reinterpret_cast<TokenInfo*>(ss + P * lds);
  TokenInfo& ci = *(&rj + 1);
  __shared__ float sh[32];
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int jb = blockIdx.y;
  const int64_t c0 = int64_t(c) * p.chunk, tj = c0 + jb * kRows;
  if (tj >= p.seqlen) return;
  const int T = p.seqlen, H = p.heads, G = p.groups, g = h / (H / G);
  const int valid_j = int(min(int64_t(kRows), T - tj));
  const int64_t last = min(c0 + p.chunk, int64_t(T)) - 1;
  const int nvb = int((last - c0) / kRows) + 1;
  const int64_t lane_off = (int64_t(b) * H + h) * p.geo.tpad;
  const float a_last = p.ws[p.geo.acs + lane_off + last];
  const int doc_last = doc_at(p, b, last);
  const int64_t x_stride = int64_t(H) * P, bc_stride = int64_t(G) * N;
  auto x_at = [&](const void* base, int64_t t) {
    return static_cast<const bf16*>(base) + ((int64_t(b) * T + t) * H + h) * P;
  };
  auto bc_at = [&](const void* base, int64_t t) {
    return static_cast<const bf16*>(base) + ((int64_t(b) * T + t) * G + g) * N;
  };
  load_tile<N>(bs, bc_at(p.B, tj), bc_stride, kRows, valid_j);
  cp_async_commit();
  load_info(rj, p, b, h, tj);
  const int l = lane_id(), r0 = warp_row0() + (l >> 2);
  float acc[P / 8][4];
  zero(acc);
  const bf16* dS = reinterpret_cast<const bf16*>(p.ws + p.geo.dstates) +
                   ((int64_t(b) * p.geo.chunks + c) * H + h) * P * N;
  for (int k0 = 0; k0 < N; k0 += 64) {
    load_tile<64>(ss, dS + k0, N, P, P);
    cp_async_commit();
    cp_async_wait();
    __syncthreads();
    mma_ss<P / 8, 64, true, true>(acc, bs, ldn, warp_row0(), k0, ss, lds, 0);
    __syncthreads();
  }
  {
    const float f0 = rj.doc[r0] == doc_last ? ex2((a_last - rj.a[r0]) * kLog2e) : 0.f;
    const float f1 = rj.doc[r0 + 8] == doc_last ? ex2((a_last - rj.a[r0 + 8]) * kLog2e) : 0.f;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt)
      acc[nt][0] *= f0, acc[nt][1] *= f0, acc[nt][2] *= f1, acc[nt][3] *= f1;
  }
  for (int ib = jb; ib < nvb; ++ib) {
    const int64_t ti = c0 + ib * kRows;
    const int valid_i = int(min(int64_t(kRows), T - ti));
    load_tile<N>(cs, bc_at(p.C, ti), bc_stride, kRows, valid_i);
    load_tile<P>(ds, x_at(p.dy, ti), x_stride, kRows, valid_i);
    cp_async_commit();
    load_info(ci, p, b, h, ti);
    cp_async_wait();
    __syncthreads();
    float s[8][4];  // (B_j . C_i) E_ij: rows j, columns i
    zero(s);
    mma_ss<8, N, true, true>(s, bs, ldn, warp_row0(), 0, cs, ldn, 0);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + (e >> 1) * 8, col = nt * 8 + 2 * (l & 3) + (e & 1);
        const bool on = (ib > jb || col >= row) && rj.doc[row] == ci.doc[col];
        s[nt][e] = on ? s[nt][e] * ex2((ci.a[col] - rj.a[row]) * kLog2e) : 0.f;
      }
    uint32_t pf[4][4];
    to_afrag(s, pf);
    mma_rs<P / 8, 4, false>(acc, pf, ds, ldp);
    __syncthreads();
  }
  // Epilogue: X'_j = acc; x_j . X'_j, dx_j = dt_j X'_j + D dy_j, and the dD partial sums.
  load_tile<P>(ss, x_at(p.x, tj), x_stride, kRows, valid_j);
  load_tile<P>(ds, x_at(p.dy, tj), x_stride, kRows, valid_j);
  cp_async_commit();
  cp_async_wait();
  __syncthreads();
  bf16* dx = static_cast<bf16*>(p.dx);
  float dd = 0.f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + half * 8;
    const float dt = rj.dt[row];
    float v = 0.f;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int col = nt * 8 + 2 * (l & 3);
      const float2 xv =
          __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ss + row * ldp + col));
      const float2 dyv =
          __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(ds + row * ldp + col));
      const float a0 = acc[nt][2 * half], a1 = acc[nt][2 * half + 1];
      v += xv.x * a0 + xv.y * a1;
      dd += xv.x * dyv.x + xv.y * dyv.y;
      float d0 = 0.f, d1 = 0.f;
      if (p.D) {
        d0 = p.d_per_channel ? p.D[h * P + col] : p.D[h];
        d1 = p.d_per_channel ? p.D[h * P + col + 1] : p.D[h];
      }
      if (row < valid_j)
        *reinterpret_cast<uint32_t*>(dx + ((int64_t(b) * T + tj + row) * H + h) * P + col) =
            pack_bf16(dt * a0 + d0 * dyv.x, dt * a1 + d1 * dyv.y);
    }
    v = quad_sum(v);
    if ((l & 3) == 0) p.ws[p.geo.delta + lane_off + tj + row] = v;
  }
  if (p.D) {
    const int64_t tile = int64_t(b) * (p.geo.tpad / kRows) + tj / kRows;
    float* part = p.ws + p.geo.part_d + (tile * H + h) * p.geo.d_cols;
    if (!p.d_per_channel) {
      dd = block_sum(dd, sh);
      if (threadIdx.x == 0) part[0] = dd;
    } else if (threadIdx.x < P) {
      const int col = threadIdx.x;
      float v = 0.f;
      for (int row = 0; row < kRows; ++row)
        v += __bfloat162float(ss[row * ldp + col]) * __bfloat162float(ds[row * ldp + col]);
      part[col] = v;
    }
  }
}

// dB (kDB) or dC for one 64-token tile r, 128 (or N) states from n0, summed over a split of the
// group's heads: acc = sum_h [ (f_r L_r) S + sum_s (w_rs (L_r . R_s)) V_s ], where for dB
// L = x, R = dy, V = C, S = dS_c+1, f = dt u and for dC L = dy, R = x, V = B, S = S_c, f = v.
template <int P, int NB, bool kDB>
__global__ __launch_bounds__(kThreads) void dbc_kernel(SsdParams p) {
  constexpr int ldp = P + kPad, ldv = NB + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* ls = reinterpret_cast<bf16*>(smem);  // L rows r   [64][ldp]
  bf16* rs = ls + kRows * ldp;               // R rows s   [64][ldp]
  bf16* vs = rs + kRows * ldp;               // V rows s   [64][ldv]
  bf16* ss = vs + kRows * ldv;               // S          [P][ldv]
  TokenInfo& ri = *reinterpret_cast<TokenInfo*>(ss + P * ldv);
  TokenInfo& si = *(&ri + 1);
  const int T = p.seqlen, H = p.heads, G = p.groups, N = p.d_state, hpg = H / G;
  const int split = blockIdx.x % p.geo.splits, cg = blockIdx.x / p.geo.splits;
  const int g = cg % G, c = cg / G, b = blockIdx.z;
  const int rb = blockIdx.y / (N / NB), n0 = (blockIdx.y % (N / NB)) * NB;
  const int64_t c0 = int64_t(c) * p.chunk, tr = c0 + rb * kRows;
  if (tr >= T) return;
  const int valid_r = int(min(int64_t(kRows), T - tr));
  const int64_t last = min(c0 + p.chunk, int64_t(T)) - 1;
  const int nvb = int((last - c0) / kRows) + 1;
  const int doc_last = doc_at(p, b, last), doc_state = doc_at(p, b, c == 0 ? 0 : c0 - 1);
  const bool has_state = kDB || c > 0 || p.initial_state;
  const int64_t x_stride = int64_t(H) * P, bc_stride = int64_t(G) * N;
  const bf16* L = static_cast<const bf16*>(kDB ? p.x : p.dy);
  const bf16* R = static_cast<const bf16*>(kDB ? p.dy : p.x);
  const bf16* V = static_cast<const bf16*>(kDB ? p.C : p.B);
  const bf16* S = reinterpret_cast<const bf16*>(p.ws + (kDB ? p.geo.dstates : p.geo.states));
  const int l = lane_id(), r0 = warp_row0() + (l >> 2);
  float acc[NB / 8][4];
  zero(acc);
  const int h_begin = g * hpg + split * int(p.geo.heads_per_split);
  const int h_end = min(h_begin + int(p.geo.heads_per_split), (g + 1) * hpg);
  for (int h = h_begin; h < h_end; ++h) {
    load_tile<P>(ls, L + ((int64_t(b) * T + tr) * H + h) * P, x_stride, kRows, valid_r);
    if (has_state)
      load_tile<NB>(ss, S + ((int64_t(b) * p.geo.chunks + c) * H + h) * P * N + n0, N, P, P);
    cp_async_commit();
    load_info(ri, p, b, h, tr);
    const float a_last = p.ws[p.geo.acs + (int64_t(b) * H + h) * p.geo.tpad + last];
    cp_async_wait();
    __syncthreads();
    if (has_state) {
      float f[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + half * 8;
        f[half] =
            kDB ? (ri.doc[row] == doc_last ? ex2((a_last - ri.a[row]) * kLog2e) * ri.dt[row] : 0.f)
                : (ri.doc[row] == doc_state ? ex2(ri.a[row] * kLog2e) : 0.f);
      }
      mma_ss<NB / 8, P, true, false, true>(acc, ls, ldp, warp_row0(), 0, ss, ldv, 0, f[0], f[1]);
    }
    const int s_begin = kDB ? rb : 0, s_end = kDB ? nvb : rb + 1;
    for (int sb = s_begin; sb < s_end; ++sb) {
      const int64_t ts = c0 + sb * kRows;
      const int valid_s = int(min(int64_t(kRows), T - ts));
      __syncthreads();
      load_tile<P>(rs, R + ((int64_t(b) * T + ts) * H + h) * P, x_stride, kRows, valid_s);
      load_tile<NB>(vs, V + ((int64_t(b) * T + ts) * G + g) * N + n0, bc_stride, kRows, valid_s);
      cp_async_commit();
      load_info(si, p, b, h, ts);
      cp_async_wait();
      __syncthreads();
      float u[8][4];  // L_r . R_s, rows r, columns s
      zero(u);
      mma_ss<8, P, true, true>(u, ls, ldp, warp_row0(), 0, rs, ldp, 0);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = r0 + (e >> 1) * 8, col = nt * 8 + 2 * (l & 3) + (e & 1);
          float w = 0.f;
          if (ri.doc[row] == si.doc[col]) {
            if (kDB && (sb > rb || col >= row))  // row j, column i
              w = ex2((si.a[col] - ri.a[row]) * kLog2e) * ri.dt[row];
            if (!kDB && (sb < rb || col <= row))  // row i, column j
              w = ex2((ri.a[row] - si.a[col]) * kLog2e) * si.dt[col];
          }
          u[nt][e] *= w;
        }
      uint32_t uf[4][4];
      to_afrag(u, uf);
      mma_rs<NB / 8, 4, false>(acc, uf, vs, ldv);
    }
    __syncthreads();
  }
  float* out = p.ws + p.geo.dbc + (kDB ? 0 : p.geo.splits * p.batch * p.geo.tpad * G * N) +
               ((int64_t(split) * p.batch + b) * p.geo.tpad + tr) * G * N + int64_t(g) * N + n0;
#pragma unroll
  for (int nt = 0; nt < NB / 8; ++nt) {
    const int col = nt * 8 + 2 * (l & 3);
    *reinterpret_cast<float2*>(out + int64_t(r0) * G * N + col) =
        make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2*>(out + int64_t(r0 + 8) * G * N + col) =
        make_float2(acc[nt][2], acc[nt][3]);
  }
}

// dB and dC: the splits' partial sums added in order, rounded to bf16.
__global__ void reduce_bc_kernel(SsdParams p) {
  const int64_t gn = int64_t(p.groups) * p.d_state, per_b = int64_t(p.seqlen) * gn;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * per_b) return;
  const int64_t b = i / per_b, rest = i % per_b;
  const int64_t stride = p.batch * p.geo.tpad * gn, at = b * p.geo.tpad * gn + rest;
  const float* dbp = p.ws + p.geo.dbc;
  const float* dcp = dbp + p.geo.splits * stride;
  float sb = 0.f, sc = 0.f;
  for (int s = 0; s < p.geo.splits; ++s) sb += dbp[s * stride + at], sc += dcp[s * stride + at];
  static_cast<bf16*>(p.dB)[i] = __float2bfloat16_rn(sb);
  static_cast<bf16*>(p.dC)[i] = __float2bfloat16_rn(sc);
}

// Per (chunk, head, batch row), one thread per token: da, its reverse scan, ddt_raw and the dA /
// ddt_bias partial sums.
__global__ void dt_grad_kernel(SsdParams p) {
  __shared__ float sh[256];
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int nc = int(p.geo.chunks);
  const int64_t c0 = int64_t(c) * p.chunk, t = c0 + threadIdx.x;
  const int64_t last = min(c0 + p.chunk, int64_t(p.seqlen)) - 1;
  const bool valid = t < p.seqlen;
  const int64_t lane = (int64_t(b) * p.heads + h) * p.geo.tpad + t;
  float kappa = 0.f;
  const float* kp = p.ws + p.geo.kappa + ((int64_t(b) * p.heads + h) * nc + c) * p.geo.pass_blocks;
  for (int k = 0; k < p.geo.pass_blocks; ++k) kappa += kp[k];
  const float dt = p.ws[p.geo.dt + lane];
  const float delta = valid ? p.ws[p.geo.delta + lane] : 0.f;
  const float da = valid ? p.ws[p.geo.r + lane] - dt * delta + (t == last ? kappa : 0.f) : 0.f;
  const float rev = block_scan<true>(da, sh);
  float draw = 0.f;
  if (valid) {
    const float raw =
        p.dt[(int64_t(b) * p.seqlen + t) * p.heads + h] + (p.dt_bias ? p.dt_bias[h] : 0.f);
    const float v = p.dt_softplus ? softplus(raw) : raw;
    const bool clamped = v < p.dt_min || v > p.dt_max;
    draw = clamped ? 0.f : (delta + p.A[h] * rev) * (p.dt_softplus ? sigmoid(raw) : 1.f);
    p.ddt[(int64_t(b) * p.seqlen + t) * p.heads + h] = draw;
  }
  const float sa = block_sum(dt * rev, sh);
  const float sb = block_sum(draw, sh);
  if (threadIdx.x == 0) {
    p.ws[p.geo.part_a + (int64_t(b) * nc + c) * p.heads + h] = sa;
    p.ws[p.geo.part_bias + (int64_t(b) * nc + c) * p.heads + h] = sb;
  }
}

// dA, ddt_bias, dD (+=): the partial sums of each head added in order.
__global__ void reduce_params_kernel(SsdParams p) {
  const int h = blockIdx.x, nc = int(p.geo.chunks);
  if (threadIdx.x == 0) {
    float sa = 0.f, sb = 0.f;
    for (int64_t i = 0; i < int64_t(p.batch) * nc; ++i) {
      sa += p.ws[p.geo.part_a + i * p.heads + h];
      sb += p.ws[p.geo.part_bias + i * p.heads + h];
    }
    p.dA[h] += sa;
    if (p.ddt_bias) p.ddt_bias[h] += sb;
  }
  if (!p.dD) return;
  const int64_t tiles = p.geo.tpad / kRows, used = (p.seqlen + kRows - 1) / kRows;
  for (int col = threadIdx.x; col < p.geo.d_cols; col += blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < p.batch; ++b)
      for (int64_t k = 0; k < used; ++k)
        s += p.ws[p.geo.part_d + ((b * tiles + k) * p.heads + h) * p.geo.d_cols + col];
    p.dD[h * p.geo.d_cols + col] += s;
  }
}

template <int P, int N>
void launch_dx(const SsdParams& p, cudaStream_t stream) {
  const size_t smem =
      (2 * kRows * (N + kPad) + kRows * (P + kPad) + P * (64 + kPad)) * sizeof(bf16) +
      2 * sizeof(TokenInfo);
  CUDA_CHECK(cudaFuncSetAttribute(dx_kernel<P, N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  dx_kernel<P, N>
      <<<dim3(unsigned(p.geo.chunks * p.heads), unsigned(p.chunk / kRows), unsigned(p.batch)),
         kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

template <int P, int NB, bool kDB>
void launch_dbc(const SsdParams& p, cudaStream_t stream) {
  const size_t smem =
      (2 * kRows * (P + kPad) + (kRows + P) * (NB + kPad)) * sizeof(bf16) + 2 * sizeof(TokenInfo);
  CUDA_CHECK(cudaFuncSetAttribute(
      dbc_kernel<P, NB, kDB>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(unsigned(p.geo.chunks * p.groups * p.geo.splits),
                  unsigned(p.chunk / kRows * (p.d_state / NB)), unsigned(p.batch));
  dbc_kernel<P, NB, kDB><<<grid, kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

template <int P, int N>
void launch_products(const SsdParams& p, cudaStream_t stream) {
  constexpr int NB = N < 128 ? N : 128;
  launch_dx<P, N>(p, stream);
  launch_dbc<P, NB, true>(p, stream);
  launch_dbc<P, NB, false>(p, stream);
}

}  // namespace
}  // namespace ssd

void ssd_bwd_cuda(const SsdParams& p, void* stream_ptr) {
  using namespace ssd;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  launch_chunk_scan(p, true, stream);
  launch_chunk_state(p, true, stream);
  launch_state_pass(p, true, stream);
  switch (p.head_dim * 1000 + p.d_state) {
    case 64064:
      launch_products<64, 64>(p, stream);
      break;
    case 64128:
      launch_products<64, 128>(p, stream);
      break;
    case 64256:
      launch_products<64, 256>(p, stream);
      break;
    case 128064:
      launch_products<128, 64>(p, stream);
      break;
    case 128128:
      launch_products<128, 128>(p, stream);
      break;
    case 128256:
      launch_products<128, 256>(p, stream);
      break;
    default:
      BRAID_FAIL("ssd (CUDA): no kernel for head dim ", p.head_dim, ", d_state ", p.d_state);
  }
  const int64_t bc = int64_t(p.batch) * p.seqlen * p.groups * p.d_state;
  reduce_bc_kernel<<<unsigned((bc + 255) / 256), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  dt_grad_kernel<<<dim3(unsigned(p.geo.chunks * p.heads), 1, unsigned(p.batch)), p.chunk, 0,
                   stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  reduce_params_kernel<<<unsigned(p.heads), 128, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
