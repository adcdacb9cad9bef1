// SSD backward on Hopper (sm_90a), the default there for bf16 with d_state 64 or 128
// (SsdParams::hopper): one fused kernel in place of the chunked backward's chunk_state, reverse
// state pass and dx kernels (ssd_bwd.cu keeps dB and dC, the dt pass and the reductions). The
// notation of ssd_cuda.h and ssd_fwd_hopper.cu: tiles of 64 tokens, a_p, doc_S and L as there,
// G_k+1 the gradient of the state leaving tile k. Walking the tiles in reverse:
//   dS_k    = [doc_L = doc_S] e^(a_L - a_p) G_k+1 + sum_i v_i dy_i C_i^T,
//             v_i = [doc_i = doc_S] e^(a_i - a_p)
//   X'_j    = u_j G_k+1 B_j
//             + sum_{i >= j in the tile, doc_i = doc_j} e^(a_i - a_j) (B_j . C_i) dy_i,
//             u_j = [doc_j = doc_L] e^(a_L - a_j)
//   dx_j    = dt_j X'_j + D dy_j,  delta_j = x_j . X'_j,  dD += x_j . dy_j,
//   r_j     = dy_j . (y_j - D x_j)  (given the forward's y_scan)
// and, where tile k ends chunk c, G_k+1 is the chunked backward's dS_c+1: stored (bf16) for the
// dB and dC kernels, with kappa_c = <dS_c+1, S_c+1> (S_c+1 from the forward's states). One block
// per (head, 64 channels of P, batch row), as the forward (ssd_hopper.cuh):
//   - producer: dy, x, y_scan (the block's channels), B, C (TMA), a, dt, documents and the a and
//     document of the token before the tile (bulk copies), tiles from the last;
//   - state gradient: G in f32 accumulators; per tile it hands G_k+1 in bf16 to the dx
//     warpgroup (and to the workspace at chunk ends, with kappa), then steps it to dS_k (wgmma:
//     A = the weighted dy^T from registers, B = C); dinitial_state = dS_0;
//   - dx: per tile the weighted transposed scores (B_j . C_i, from launch_scores) times dy and
//     B G^T, then dx, delta, r and the dD partial sums.
// The r, delta, kappa and dD partial sums are per 64 channels (summed in order by dt_grad and
// reduce_params: SsdParams::r_parts, delta_parts, kappa_parts, d_whole).
#include <cuda.h>
#include <cuda_runtime.h>

#include "layers/ssd/ssd_hopper.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace ssd {
namespace {

// Shared memory of the kernel, in bf16 elements from a 1024-byte-aligned base.
template <int N>
struct FusedBwd {
  static constexpr int kStages = 3;
  static constexpr int kPanels = N / 64;
  static constexpr int kScalars = 3 * 64 + 8;      // a, dt, doc [64]; a, doc of tokens t0-4..t0-1
  static constexpr int dy = 0;                     // [stages][64 t][64 p]
  static constexpr int x = dy + kStages * kPanel;  // [stages][64 t][64 p]
  static constexpr int ys = x + kStages * kPanel;  // y_scan [stages][64 t][64 p]
  static constexpr int b = ys + kStages * kPanel;  // [stages][panels][64 t][64 n]
  static constexpr int c = b + kStages * kPanels * kPanel;      // [stages][panels][64 t][64 n]
  static constexpr int g = c + kStages * kPanels * kPanel;      // [2][panels][64 p][64 n]
  static constexpr int scalars = g + 2 * kPanels * kPanel;      // [stages][kScalars] (4 B)
  static constexpr int red = scalars + kStages * kScalars * 2;  // f32 kappa [2][4], dD [4][64]
  static constexpr int bars =
      red + (8 + 4 * 64) * 2;  // full, empty [stages], ready, freed [2] (8 B)
  static constexpr int bytes = (bars + (2 * kStages + 4) * 4) * 2 + 1024;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Named barriers of one warpgroup (128 threads) for its block-wide sums.
constexpr int kKappaSum = 1, kDSum = 2;
#endif

template <int N>
__global__ void __launch_bounds__(kFusedThreads, 1)
    fused_bwd_kernel(const __grid_constant__ CUtensorMap tm_x,
                     const __grid_constant__ CUtensorMap tm_dy,
                     const __grid_constant__ CUtensorMap tm_b,
                     const __grid_constant__ CUtensorMap tm_c,
                     const __grid_constant__ CUtensorMap tm_ys, const SsdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = FusedBwd<N>;
  constexpr int S = L::kStages, kP = L::kPanels, kSc = L::kScalars;
  extern __shared__ unsigned char smem_raw[];
  bf16* sm = aligned_smem(smem_raw);
  float* scal = reinterpret_cast<float*>(sm + L::scalars);
  float* red = reinterpret_cast<float*>(sm + L::red);
  const FusedBlock blk(p, reinterpret_cast<uint64_t*>(sm + L::bars), S);
  const int h = blk.h, ps = blk.ps, b = blk.b, g = blk.g, ntiles = blk.ntiles;
  const int64_t lane_off = blk.lane_off;
  uint64_t *full = blk.full, *empty = blk.empty, *ready = blk.ready, *freed = blk.freed;
  const int H = p.heads, P = p.head_dim, T = p.seqlen, nc = int(p.geo.chunks), wg = warpgroup();
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, q = lane & 3;
  const int r0 = warp * 16 + (lane >> 2);

  if (wg == 0) {
    if (threadIdx.x == 0) {
      const int* docs = reinterpret_cast<const int*>(p.ws + p.geo.docs) + int64_t(b) * p.geo.tpad;
      for (int m = 0; m < ntiles; ++m) {
        const int k = ntiles - 1 - m, st = m % S, row = b * T + k * kRows;
        if (m >= S) mbar_wait(empty + st, (m / S - 1) & 1);
        mbar_arrive_expect_tx(full + st, (2 + (p.y_scan ? 1 : 0) + 2 * kP) * kPanel * 2 +
                                             3 * 64 * 4 + (k > 0 ? 2 * 16 : 0));
        tma_load_3d(sm + L::dy + st * kPanel, &tm_dy, ps * 64, h, row, full + st);
        tma_load_3d(sm + L::x + st * kPanel, &tm_x, ps * 64, h, row, full + st);
        if (p.y_scan) tma_load_3d(sm + L::ys + st * kPanel, &tm_ys, ps * 64, h, row, full + st);
        for (int c = 0; c < kP; ++c) {
          tma_load_3d(sm + L::b + (st * kP + c) * kPanel, &tm_b, c * 64, g, row, full + st);
          tma_load_3d(sm + L::c + (st * kP + c) * kPanel, &tm_c, c * 64, g, row, full + st);
        }
        float* sc = scal + st * kSc;
        bulk_load(sc, p.ws + p.geo.acs + lane_off + k * kRows, 256, full + st);
        bulk_load(sc + 64, p.ws + p.geo.dt + lane_off + k * kRows, 256, full + st);
        bulk_load(sc + 128, docs + k * kRows, 256, full + st);
        if (k > 0) {
          bulk_load(sc + 192, p.ws + p.geo.acs + lane_off + k * kRows - 4, 16, full + st);
          bulk_load(sc + 196, docs + k * kRows - 4, 16, full + st);
        }
      }
    }
    return;
  }

  // Tile k = ntiles - 1 - m (once its stage is full; the token before it loaded with it).
  auto tile_at = [&](int m) {
    const float* sc = scal + (m % S) * kSc;
    const int k = ntiles - 1 - m;
    return TileData(p, sc, int64_t(k) * kRows, k > 0 ? sc[195] : 0.f,
                    k > 0 ? reinterpret_cast<const int*>(sc)[199] : 0);
  };
  // Every consumer thread hands the stage back after its last read of it (an arrival releases
  // only the arriving thread's accesses).
  auto release = [&](int st) { mbar_arrive(empty + st); };

  if (wg == 1) {
    // G: rows p = r0, r0 + 8 of this block's channels, columns n = 8 nt + 2 q + {0, 1}.
    float gs[N / 8][4];
    const int64_t state_off = ((int64_t(b) * H + h) * P + ps * 64) * N;
    auto at = [&](int nt, int half) { return int64_t(r0 + 8 * half) * N + nt * 8 + 2 * q; };
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 v = make_float2(0.f, 0.f);
        if (p.dfinal_state)
          v = *reinterpret_cast<const float2*>(p.dfinal_state + state_off + at(nt, half));
        gs[nt][2 * half] = v.x, gs[nt][2 * half + 1] = v.y;
      }
    const bf16* states = reinterpret_cast<const bf16*>(p.ws + p.geo.states);
    bf16* dstates = reinterpret_cast<bf16*>(p.scratch + p.geo.dstates);
    auto chunk_off = [&](int c) {
      return ((int64_t(b) * nc + c) * H + h) * P * N + int64_t(ps) * 64 * N;
    };
    for (int m = 0; m < ntiles; ++m) {
      const int k = ntiles - 1 - m, st = m % S;
      // G_k+1 to buffer m % 2; where tile k ends chunk c, to dS_c+1 and kappa_c too.
      const int c = int(int64_t(k) * kRows / p.chunk);
      const bool chunk_end = k == ntiles - 1 || (int64_t(k + 1) * kRows) % p.chunk == 0;
      wait_freed(freed, m);  // dx is done with buffer m % 2
      hand_over_bf16<N>(gs, sm + L::g + (m & 1) * kP * kPanel, ready + (m & 1),
                        chunk_end ? dstates + chunk_off(c) : nullptr);
      if (chunk_end) {
        // S_c+1: the next chunk's entering state (bf16), or the last state (f32).
        float kap = 0.f;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float2 s;
            if (c + 1 < nc)
              s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                  states + chunk_off(c + 1) + at(nt, half)));
            else
              s = *reinterpret_cast<const float2*>(p.ws + p.geo.last + state_off + at(nt, half));
            kap += gs[nt][2 * half] * s.x + gs[nt][2 * half + 1] * s.y;
          }
        kap = warp_sum(kap);
        if (lane == 0) red[(c & 1) * 4 + warp] = kap;
        named_sync(kKappaSum, 128);
        if (threadIdx.x == 128) {
          const float* r = red + (c & 1) * 4;
          p.scratch[p.geo.kappa + ((int64_t(b) * H + h) * nc + c) * p.geo.pass_blocks + ps] =
              r[0] + r[1] + r[2] + r[3];
        }
      }
      mbar_wait(full + st, (m / S) & 1);
      const TileData t = tile_at(m);
      const float a_last = t.a[t.last];
      const float keep = t.doc[t.last] == t.doc_s ? ex2((a_last - t.a_prev) * kLog2e) : 0.f;
      // v_i = [doc_i = doc_S] e^(a_i - a_p), 0 past the end (dy's rows there are not zeros).
      state_step<N>(gs, keep, sm + L::dy + st * kPanel, sm + L::c + st * kP * kPanel, [&](int i) {
        const float2 a = *reinterpret_cast<const float2*>(t.a + i);
        const int2 doc = *reinterpret_cast<const int2*>(t.doc + i);
        return make_float2(
            i <= t.last && doc.x == t.doc_s ? ex2((a.x - t.a_prev) * kLog2e) : 0.f,
            i + 1 <= t.last && doc.y == t.doc_s ? ex2((a.y - t.a_prev) * kLog2e) : 0.f);
      });
      release(st);
    }
    if (p.dinitial_state)
#pragma unroll
      for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          *reinterpret_cast<float2*>(p.dinitial_state + state_off + at(nt, half)) =
              make_float2(gs[nt][2 * half], gs[nt][2 * half + 1]);
    return;
  }

  // The dx warpgroup: rows j = r0, r0 + 8 of each tile, columns p = 8 nt + 2 q + {0, 1}.
  const uint4* scores = reinterpret_cast<const uint4*>(p.scratch + p.geo.scores);
  uint4 cb[4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) cb[kk] = scores[score_frag(p, b, ntiles - 1, g, warp, kk, lane)];
  const int64_t x_stride = int64_t(H) * P;
  bf16* dx = static_cast<bf16*>(p.dx) + (int64_t(b) * T * H + h) * P + ps * 64;
  float* delta = p.scratch + p.geo.delta + int64_t(ps) * p.batch * H * p.geo.tpad + lane_off;
  float* rr = p.scratch + p.geo.r + int64_t(ps) * p.batch * H * p.geo.tpad + lane_off;
  const float dh = p.D && !p.d_per_channel ? p.D[h] : 0.f;
  float dd[8][2] = {};  // sum over the rows of x . dy, per column
  for (int m = 0; m < ntiles; ++m) {
    const int k = ntiles - 1 - m, st = m % S;
    mbar_wait(full + st, (m / S) & 1);
    const TileData t = tile_at(m);
    float aj[2];
    int dj[2];
#pragma unroll
    for (int half = 0; half < 2; ++half)
      aj[half] = t.a[r0 + 8 * half], dj[half] = t.doc[r0 + 8 * half];
    // A = the transposed scores weighted by [j <= i <= L, doc_i = doc_j] e^(a_i - a_j).
    uint32_t af[4][4];
    weigh_scores(af, cb, [&](int half, int i) {
      const int row = r0 + 8 * half;
      const float2 a = *reinterpret_cast<const float2*>(t.a + i);
      const int2 doc = *reinterpret_cast<const int2*>(t.doc + i);
      return make_float2(
          i >= row && i <= t.last && doc.x == dj[half] ? ex2((a.x - aj[half]) * kLog2e) : 0.f,
          i + 1 >= row && i + 1 <= t.last && doc.y == dj[half] ? ex2((a.y - aj[half]) * kLog2e)
                                                               : 0.f);
    });
    if (k > 0)  // the next tile's scores, under this tile's products
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) cb[kk] = scores[score_frag(p, b, k - 1, g, warp, kk, lane)];
    const bf16* dys = sm + L::dy + st * kPanel;
    const bf16* xs = sm + L::x + st * kPanel;
    const bf16* yss = sm + L::ys + st * kPanel;
    float acc[8][4], acc_s[8][4];
    tile_products<N>(acc, acc_s, af, dys, sm + L::b + st * kP * kPanel,
                     sm + L::g + (m & 1) * kP * kPanel, ready, m);
    mbar_arrive(freed + (m & 1));  // G read
    const float a_last = t.a[t.last];
    const int doc_last = t.doc[t.last];
    uint32_t out[2][8];
    float dl[2], rl[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + 8 * half;
      const float u = dj[half] == doc_last ? ex2((a_last - aj[half]) * kLog2e) : 0.f;
      const float dt = t.dt[row];
      const bool valid = row <= t.last;
      float v = 0.f, r = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = nt * 8 + 2 * q;
        const float x0 = acc[nt][2 * half] + u * acc_s[nt][2 * half],
                    x1 = acc[nt][2 * half + 1] + u * acc_s[nt][2 * half + 1];
        float d0 = dh, d1 = dh;
        if (p.d_per_channel) d0 = p.D[h * P + ps * 64 + col], d1 = p.D[h * P + ps * 64 + col + 1];
        const float2 xv =
            __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + sw(row, col)));
        const float2 gv =
            __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dys + sw(row, col)));
        out[half][nt] = pack_bf16(dt * x0 + d0 * gv.x, dt * x1 + d1 * gv.y);
        v += xv.x * x0 + xv.y * x1;
        if (p.y_scan) {
          const float2 yv =
              __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(yss + sw(row, col)));
          r += gv.x * yv.x + gv.y * yv.y;
        }
        if (valid) dd[nt][0] += xv.x * gv.x, dd[nt][1] += xv.y * gv.y;
      }
      dl[half] = quad_sum(v), rl[half] = quad_sum(r);
    }
    release(st);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + 8 * half;
      if (row > t.last) continue;
      if (q == 0) {
        delta[t.t0 + row] = dl[half];
        if (p.y_scan) rr[t.t0 + row] = rl[half];
      }
      const int64_t o = (t.t0 + row) * x_stride + 2 * q;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) *reinterpret_cast<uint32_t*>(dx + o + nt * 8) = out[half][nt];
    }
  }
  if (p.D) {
    // dD partial sums of this (batch row, head), per channel: over the rows of a warp (lanes of
    // equal lane % 4), then the four warps in order.
    float* rd = red + 8;  // [4 warps][64 columns]
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = dd[nt][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (lane < 4) rd[warp * 64 + nt * 8 + 2 * q + e] = v;
      }
    named_sync(kDSum, 128);
    const int col = threadIdx.x - 256;
    if (col < 64)
      p.scratch[p.geo.part_d + (int64_t(b) * H + h) * P + ps * 64 + col] =
          rd[col] + rd[64 + col] + rd[128 + col] + rd[192 + col];
  }
#else
  (void)tm_x, (void)tm_dy, (void)tm_b, (void)tm_c, (void)p;
#endif
}

// Shared memory of dbc_kernel_wgmma, in bf16 elements from a 1024-byte-aligned base: V's tiles
// of every partner of the block (at most chunk / 64) stay for all its heads.
template <int P, int NB>
struct DbcSmem {
  static constexpr int kPP = P / 64, kNP = NB / 64;                // panels of a row tile and of V
  static constexpr int l = 0;                                      // L rows r [kPP][64][64]
  static constexpr int r = l + kPP * kPanel;                       // R rows s [2][kPP][64][64]
  static constexpr int s = r + 2 * kPP * kPanel;                   // S [kNP][P][64]
  static constexpr int info = s + kNP * P * 64;                    // TokenInfo ri, si[2]
  static constexpr int v = info + 3 * int(sizeof(TokenInfo)) / 2;  // V rows [partners][kNP][64][64]
  static_assert(v % 512 == 0, "V's panels start on 1024-byte boundaries");
  static int bytes(int chunk) { return (v + chunk / 64 * kNP * kPanel) * 2 + 1024; }
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Rows [0, rows) x columns [0, W) of a bf16 matrix (row stride gs) into swizzled panels of 64
// columns, `panel` elements apart, by cp.async; rows at or past `valid` read as zeros. The caller
// commits and waits.
template <int W>
__device__ __forceinline__ void load_panels(bf16* s, const bf16* g, int64_t gs, int rows, int valid,
                                            int panel) {
  constexpr int kVec = W / 8;
  for (int i = threadIdx.x; i < rows * kVec; i += kThreads) {
    const int r = i / kVec, v = i % kVec;
    const bool ok = r < valid;
    cp_async16(s + (v / 8) * panel + sw(r, (v & 7) * 8), ok ? g + r * gs + v * 8 : g, ok);
  }
}
#endif

// dB (kDB) or dC on Hopper: dbc_kernel's block (ssd_bwd.cu, DbcBlock) with its products on
// wgmma (one warpgroup), the tiles in swizzled panels and the partner tiles double-buffered:
//   acc += (f L_r) S      A: L_r's fragments, rows scaled by f, from registers; B: S, MN-major
//   u    = L_r R_s^T      both K-major
//   acc += (w u) V_s      A: the weighted u from registers; B: V_s, MN-major
// The operands round to bf16 as in dbc_kernel (the same tolerances).
template <int P, int NB, bool kDB>
__global__ __launch_bounds__(kThreads) void dbc_kernel_wgmma(SsdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = DbcSmem<P, NB>;
  extern __shared__ unsigned char smem_raw[];
  bf16* sm = aligned_smem(smem_raw);
  TokenInfo* info = reinterpret_cast<TokenInfo*>(sm + L::info);
  const bf16* ls = sm + L::l;
  const DbcBlock<kDB> k(p, NB);
  if (k.empty) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r0 = warp * 16 + (lane >> 2);
  float acc[NB / 8][4];
  zero(acc);
  for (int sb = k.s_begin; sb < k.s_end; ++sb) {  // committed with the first head's tiles
    const int64_t ts = k.c0 + sb * kRows;
    load_panels<NB>(sm + L::v + (sb - k.s_begin) * L::kNP * kPanel, k.v_rows(ts), k.bc_stride,
                    kRows, int(min(int64_t(kRows), p.seqlen - ts)), kPanel);
  }
  for (int h = k.h_begin; h < k.h_end; ++h) {
    const DbcHead<kDB> hd(p, k, h);
    // Partner sb's R tile and token data into buffer `buf`.
    auto stage = [&](int sb, int buf) {
      const int64_t ts = k.c0 + sb * kRows;
      const int valid_s = int(min(int64_t(kRows), p.seqlen - ts));
      load_panels<P>(sm + L::r + buf * L::kPP * kPanel, hd.r_rows(ts), k.x_stride, kRows, valid_s,
                     kPanel);
      cp_async_commit();
      load_info(info[1 + buf], p, k.b, h, ts);
      dbc_column_factors<kDB>(info[1 + buf], k.doc_ref, hd.a_ref);
    };
    load_panels<P>(sm + L::l, hd.l_rows, k.x_stride, kRows, k.valid_r, kPanel);
    if (k.has_state) load_panels<NB>(sm + L::s, hd.state, p.d_state, P, P, P * 64);
    load_info(info[0], p, k.b, h, k.tr);
    stage(k.s_begin, 0);
    cp_async_wait();
    fence_proxy_async();
    __syncthreads();
    const TokenInfo& ri = info[0];
    if (k.has_state) {  // waited for with the first partner's products
      float f[2];
      dbc_state_factors<kDB>(f, k, hd, ri, r0);
      uint32_t af[P / 16][4];
#pragma unroll
      for (int kk = 0; kk < P / 16; ++kk) {
        ldsm4(af[kk], ls + (kk / 4) * kPanel +
                          sw(warp * 16 + (lane & 15), (kk % 4) * 16 + (lane >> 4) * 8));
        af[kk][0] = scale_bf16x2(af[kk][0], f[0]), af[kk][1] = scale_bf16x2(af[kk][1], f[1]);
        af[kk][2] = scale_bf16x2(af[kk][2], f[0]), af[kk][3] = scale_bf16x2(af[kk][3], f[1]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < P / 16; ++kk)
        wgmma_rs_mn<NB>(acc, af[kk], wgmma_desc_sw128(sm + L::s + kk * 16 * 64, P * 128));
      wgmma_commit();
    }
    float fr[2];
    dbc_row_factors<kDB>(fr, ri, k.doc_ref, hd.a_ref, r0);
    // At least one partner (the diagonal tile), so the state term's products are waited for
    // in the loop on every path.
    int sb = k.s_begin;
    do {
      const int buf = (sb - k.s_begin) & 1;
      // The other buffer was last read by the previous partner, waited for before its barrier.
      if (sb + 1 < k.s_end) stage(sb + 1, buf ^ 1);
      const bf16* rs = sm + L::r + buf * L::kPP * kPanel;
      const bf16* vs = sm + L::v + (sb - k.s_begin) * L::kNP * kPanel;
      float u[8][4];  // L_r . R_s, rows r, columns s
      wgmma_fence();
      wgmma_kmajor<P>(u, ls, rs);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_reg_fence(u);
      wgmma_reg_fence(acc);
      dbc_weigh<kDB>(u, fr, ri, info[1 + buf], r0, sb == k.rb);
      uint32_t uf[4][4];
      to_afrag(u, uf);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs_mn<NB>(acc, uf[kk], wgmma_desc_sw128(vs + kk * 16 * 64, kPanel * 2));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_reg_fence(acc);
      cp_async_wait();  // the next partner's tiles
      fence_proxy_async();
      __syncthreads();
    } while (++sb < k.s_end);
  }
  dbc_store<NB>(p, k, acc);
#else
  (void)p;
#endif
}

template <int P, int NB>
void launch_dbc_n(const SsdParams& p, cudaStream_t stream) {
  const int smem = DbcSmem<P, NB>::bytes(p.chunk);
  const dim3 grid(
      unsigned(p.geo.chunks * p.groups * p.geo.splits * (p.chunk / kRows) * (p.d_state / NB)),
      unsigned(p.batch));
  for (auto kernel : {dbc_kernel_wgmma<P, NB, true>, dbc_kernel_wgmma<P, NB, false>}) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
  }
}

template <int N>
void launch(const SsdParams& p, cudaStream_t stream) {
  launch_scores(p, true, stream);
  const int64_t rows = int64_t(p.batch) * p.seqlen;
  const CUtensorMap tx = tma_panel_map(p.x, rows, p.heads, p.head_dim, kRows);
  const CUtensorMap tdy = tma_panel_map(p.dy, rows, p.heads, p.head_dim, kRows);
  const CUtensorMap tb = tma_panel_map(p.B, rows, p.groups, N, kRows);
  const CUtensorMap tc = tma_panel_map(p.C, rows, p.groups, N, kRows);
  const CUtensorMap tys =
      tma_panel_map(p.y_scan ? p.y_scan : p.dy, rows, p.heads, p.head_dim, kRows);
  CUDA_CHECK(cudaFuncSetAttribute(fused_bwd_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  FusedBwd<N>::bytes));
  const dim3 grid(unsigned(p.heads * (p.head_dim / 64)), unsigned(p.batch));
  fused_bwd_kernel<N><<<grid, kFusedThreads, FusedBwd<N>::bytes, stream>>>(tx, tdy, tb, tc, tys, p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_dbc_hopper(const SsdParams& p, cudaStream_t stream) {
  switch (p.head_dim * 1000 + p.d_state) {
    case 64064:
      return launch_dbc_n<64, 64>(p, stream);
    case 64128:
      return launch_dbc_n<64, 128>(p, stream);
    case 128064:
      return launch_dbc_n<128, 64>(p, stream);
    case 128128:
      return launch_dbc_n<128, 128>(p, stream);
    default:
      BRAID_FAIL("ssd (CUDA): no Hopper dB/dC kernel for head dim ", p.head_dim, ", d_state ",
                 p.d_state);
  }
}

void launch_fused_bwd(const SsdParams& p, cudaStream_t stream) {
  with_d_state(p, "fused backward", [&](auto n) { launch<n()>(p, stream); });
}

}  // namespace ssd
}  // namespace braid
