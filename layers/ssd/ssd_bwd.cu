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
// Kernels: dy_i . (y_i - D x_i) from the forward's y_scan when given (else chunk_scan again
// with dy); chunk_state with (dy, C) and the
// reverse state pass (dS_c+1 in bf16, <dS_c+1, S_c+1>, dinitial_state); dx (per 64-token tile
// j: the state term then the tiles i >= j, like the forward's scan transposed); dbc (dB and dC,
// per 64-token tile, 128 states and a split of the group's heads, summed over the heads in
// order); then the dt/dA pass per chunk and the fixed-order reductions of the partial sums. On
// sm_90 (ssd::use_hopper) one fused kernel (ssd_bwd_hopper.cu) gives dS_c+1, kappa,
// dinitial_state, dx, delta and the dD partial sums in place of chunk_state, the pass and dx.
#include <cuda_runtime.h>

#include "layers/ssd/ssd_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace ssd {
namespace {

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
  const DbcBlock<kDB> k(p, NB);
  if (k.empty) return;
  const int r0 = warp_row0() + (lane_id() >> 2);
  float acc[NB / 8][4];
  zero(acc);
  for (int h = k.h_begin; h < k.h_end; ++h) {
    const DbcHead<kDB> hd(p, k, h);
    load_tile<P>(ls, hd.l_rows, k.x_stride, kRows, k.valid_r);
    if (k.has_state) load_tile<NB>(ss, hd.state, p.d_state, P, P);
    cp_async_commit();
    load_info(ri, p, k.b, h, k.tr);
    cp_async_wait();
    __syncthreads();
    if (k.has_state) {
      float f[2];
      dbc_state_factors<kDB>(f, k, hd, ri, r0);
      mma_ss<NB / 8, P, true, false, true>(acc, ls, ldp, warp_row0(), 0, ss, ldv, 0, f[0], f[1]);
    }
    float fr[2];
    dbc_row_factors<kDB>(fr, ri, k.doc_ref, hd.a_ref, r0);
    for (int sb = k.s_begin; sb < k.s_end; ++sb) {
      const int64_t ts = k.c0 + sb * kRows;
      const int valid_s = int(min(int64_t(kRows), p.seqlen - ts));
      __syncthreads();
      load_tile<P>(rs, hd.r_rows(ts), k.x_stride, kRows, valid_s);
      load_tile<NB>(vs, k.v_rows(ts), k.bc_stride, kRows, valid_s);
      cp_async_commit();
      load_info(si, p, k.b, h, ts);
      dbc_column_factors<kDB>(si, k.doc_ref, hd.a_ref);
      cp_async_wait();
      __syncthreads();
      float u[8][4];  // L_r . R_s, rows r, columns s
      zero(u);
      mma_ss<8, P, true, true>(u, ls, ldp, warp_row0(), 0, rs, ldp, 0);
      dbc_weigh<kDB>(u, fr, ri, si, r0, sb == k.rb);
      uint32_t uf[4][4];
      to_afrag(u, uf);
      mma_rs<NB / 8, 4, false>(acc, uf, vs, ldv);
    }
    __syncthreads();
  }
  dbc_store<NB>(p, k, acc);
}

// R = dy . (y - D x) per (batch row, token, head) from the forward's y_scan: one warp per row of
// P elements, in pairs.
__global__ void r_from_scan_kernel(SsdParams p) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= int64_t(p.batch) * p.seqlen * p.heads) return;
  const int lane = threadIdx.x & 31, P = p.head_dim, h = int(row % p.heads);
  const int64_t bt = row / p.heads, b = bt / p.seqlen, t = bt % p.seqlen;
  const __nv_bfloat162* dy =
      reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(p.dy) + row * P);
  const __nv_bfloat162* ys =
      reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(p.y_scan) + row * P);
  float v = 0.f;
  for (int i = lane; i < P / 2; i += 32) {
    const float2 g = __bfloat1622float2(dy[i]), yv = __bfloat1622float2(ys[i]);
    v += g.x * yv.x + g.y * yv.y;
  }
  v = warp_sum(v);
  if (lane == 0) p.scratch[p.geo.r + (b * p.heads + h) * p.geo.tpad + t] = v;
}

// dB and dC: the splits' partial sums added in order, rounded to bf16.
__global__ void reduce_bc_kernel(SsdParams p) {
  const int64_t gn = int64_t(p.groups) * p.d_state, per_b = int64_t(p.seqlen) * gn;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * per_b) return;
  const int64_t b = i / per_b, rest = i % per_b;
  const int64_t stride = p.batch * p.geo.tpad * gn, at = b * p.geo.tpad * gn + rest;
  const float* dbp = p.scratch + p.geo.dbc;
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
  const float* kp =
      p.scratch + p.geo.kappa + ((int64_t(b) * p.heads + h) * nc + c) * p.geo.pass_blocks;
  for (int k = 0; k < p.kappa_parts; ++k) kappa += kp[k];
  const float dt = p.ws[p.geo.dt + lane];
  float delta = 0.f;
  for (int k = 0; valid && k < p.delta_parts; ++k)
    delta += p.scratch[p.geo.delta + k * int64_t(p.batch) * p.heads * p.geo.tpad + lane];
  float r = 0.f;
  for (int k = 0; valid && k < p.r_parts; ++k)
    r += p.scratch[p.geo.r + k * int64_t(p.batch) * p.heads * p.geo.tpad + lane];
  const float da = valid ? r - dt * delta + (t == last ? kappa : 0.f) : 0.f;
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
    p.scratch[p.geo.part_a + (int64_t(b) * nc + c) * p.heads + h] = sa;
    p.scratch[p.geo.part_bias + (int64_t(b) * nc + c) * p.heads + h] = sb;
  }
}

// dA, ddt_bias, dD (+=): the partial sums of each head, each thread adding a fixed stride of
// them in order, then the threads' sums in a fixed tree (deterministic).
__global__ void reduce_params_kernel(SsdParams p) {
  __shared__ float sh[32];
  const int h = blockIdx.x;
  const int64_t n = int64_t(p.batch) * p.geo.chunks;
  float sa = 0.f, sb = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    sa += p.scratch[p.geo.part_a + i * p.heads + h];
    sb += p.scratch[p.geo.part_bias + i * p.heads + h];
  }
  sa = block_sum(sa, sh);
  sb = block_sum(sb, sh);
  if (threadIdx.x == 0) {
    p.dA[h] += sa;
    if (p.ddt_bias) p.ddt_bias[h] += sb;
  }
  if (!p.dD) return;
  // Per batch row `used` entries (tiles past the end of the sequence were never written) of
  // `width` columns, `per_col` of which sum into one column of dD.
  const int64_t tiles = p.d_whole ? 1 : p.geo.tpad / kRows;
  const int64_t used = p.d_whole ? 1 : (p.seqlen + kRows - 1) / kRows;
  const int64_t width = p.d_whole ? p.head_dim : p.geo.d_cols, per_col = width / p.geo.d_cols;
  for (int col = 0; col < p.geo.d_cols; ++col) {
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < p.batch * used * per_col; i += blockDim.x) {
      const int64_t b = i / (used * per_col), k = i / per_col % used, e = i % per_col;
      s += p.scratch[p.geo.part_d + ((b * tiles + k) * p.heads + h) * width + col * per_col + e];
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) p.dD[h * p.geo.d_cols + col] += s;
  }
}

template <int P, int NB, bool kDB>
void launch_dbc(const SsdParams& p, cudaStream_t stream) {
  const size_t smem =
      (2 * kRows * (P + kPad) + (kRows + P) * (NB + kPad)) * sizeof(bf16) + 2 * sizeof(TokenInfo);
  CUDA_CHECK(cudaFuncSetAttribute(
      dbc_kernel<P, NB, kDB>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(
      unsigned(p.geo.chunks * p.groups * p.geo.splits * (p.chunk / kRows) * (p.d_state / NB)),
      unsigned(p.batch));
  dbc_kernel<P, NB, kDB><<<grid, kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

template <int P, int N>
void launch_products(const SsdParams& p, cudaStream_t stream) {
  constexpr int NB = N < 128 ? N : 128;
  launch_dbc<P, NB, true>(p, stream);
  launch_dbc<P, NB, false>(p, stream);
}

}  // namespace
}  // namespace ssd

void ssd_bwd_cuda(const SsdParams& params, void* stream_ptr) {
  using namespace ssd;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SsdParams p = params;
  const bool hopper = use_hopper(p);
  p.delta_parts = hopper ? p.head_dim / kRows : 1;
  p.r_parts = hopper && p.y_scan ? p.head_dim / kRows : 1;  // the fused kernel reads y_scan
  p.kappa_parts = hopper ? p.head_dim / kRows : int(p.geo.pass_blocks);
  p.d_whole = hopper;
  if (!p.y_scan) {
    launch_chunk_scan(p, ScanMode::r, stream);
  } else if (!hopper) {  // (on Hopper the fused kernel reads y_scan)
    const int64_t rows = int64_t(p.batch) * p.seqlen * p.heads;
    r_from_scan_kernel<<<unsigned((rows + 7) / 8), 256, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
  }
  if (hopper) {
    launch_fused_bwd(p, stream);
  } else {
    launch_chunk_state(p, true, stream);
    launch_state_pass(p, true, stream);
    launch_chunk_scan(p, ScanMode::dx, stream);
  }
  if (hopper) {
    launch_dbc_hopper(p, stream);
  } else {
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
