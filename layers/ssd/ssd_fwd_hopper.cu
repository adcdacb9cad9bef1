// SSD forward on Hopper (sm_90a), the default there for bf16 with d_state 64 or 128
// (SsdParams::hopper): after prep (ssd_fwd.cu), two kernels in the notation of ssd_cuda.h.
//   1. scores, per (64-token tile, group, batch row): C_i . B_j for i, j in the tile (K = N, on
//      mma.sync), rounded to bf16 and stored in the order of the A fragments that the fused
//      kernel's y warpgroup feeds to its products, so that each thread loads its own 64 bytes.
//   2. fused, one block per (head, 64 channels of P, batch row), walking the sequence in 64-token
//      tiles with the tile's state S (the state entering it; [64 p, N]) kept on chip. The
//      recurrence runs at the tile, whatever the chunk size Q: with a_i the chunk's cumulative
//      dt A (from prep), a_p its value before the tile (0 at a chunk's start), L the tile's last
//      token and doc_S the document of the token before the tile (of token 0 for the first):
//        y_i     = D x_i + [doc_i = doc_S] e^(a_i - a_p) C_i S^T
//                  + sum_{j <= i in the tile, doc_j = doc_i} e^(a_i - a_j) dt_j (C_i . B_j) x_j
//        S_next  = [doc_L = doc_S] e^(a_L - a_p) S
//                  + sum_{j, doc_j = doc_L} e^(a_L - a_j) dt_j x_j B_j^T
//      which is the chunked algorithm with chunks of one tile (the same function). Warpgroups:
//      - producer: one thread loads each tile's x (its 64 channels), B and C (TMA, 128-byte
//        swizzle) and its a, dt and documents (bulk copies) into a ring of stages;
//      - state: S in f32 accumulators; per tile it scales them by the decay and adds
//        (X diag(w))^T B (wgmma, A = the weighted x^T from registers, K = 64 tokens), then
//        writes S_next in bf16 to shared memory for the y warpgroup (two buffers), and at every
//        chunk start into the workspace's states for the backward; the last S in f32;
//      - y: per tile the weighted scores times x (wgmma, A from registers, K = 64) and
//        C S^T (wgmma, both operands in shared memory, K = N), the row factors, D x; y (and
//        y - D x) stored from registers.
//      The state and y warpgroups hand the S buffers to each other through mbarriers.
// FLOPs per (64-token tile, head): 2 64 P N (state) + 2 64 N P (state term) + 64^2 P (the
// diagonal tile, computed whole), and 64^2 N per (tile, group) for the scores: less than the
// chunked kernels' 4 Q P N + Q^2 P per chunk of Q tokens, the intra-chunk part shrinking to one
// tile. Bytes: x, B, C, dt read and y written once, and the chunk states written (bf16).
#include <cuda.h>
#include <cuda_runtime.h>

#include "layers/ssd/ssd_hopper.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace ssd {
namespace {

template <int N, bool kTransposed>
__global__ __launch_bounds__(kThreads) void scores_kernel(SsdParams p) {
  constexpr int ldn = N + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* rows = reinterpret_cast<bf16*>(smem);  // C_i (transposed: B_j) [64][ldn]
  bf16* cols = rows + kRows * ldn;             // B_j (transposed: C_i) [64][ldn]
  const int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t t0 = int64_t(tile) * kRows, stride = int64_t(p.groups) * N;
  const int valid = int(min(int64_t(kRows), p.seqlen - t0));
  const int64_t at = (int64_t(b) * p.seqlen + t0) * stride + int64_t(g) * N;
  const bf16* C = static_cast<const bf16*>(p.C) + at;
  const bf16* B = static_cast<const bf16*>(p.B) + at;
  load_tile<N>(rows, kTransposed ? B : C, stride, kRows, valid);
  load_tile<N>(cols, kTransposed ? C : B, stride, kRows, valid);
  cp_async_commit();
  cp_async_wait();
  __syncthreads();
  float s[8][4];
  zero(s);
  mma_ss<8, N, true, true>(s, rows, ldn, warp_row0(), 0, cols, ldn, 0);
  uint32_t f[4][4];
  to_afrag<8>(s, f);
  uint4* out = reinterpret_cast<uint4*>(p.scratch + p.geo.scores);
  const int warp = threadIdx.x >> 5, lane = lane_id();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    out[score_frag(p, b, tile, g, warp, kk, lane)] =
        make_uint4(f[kk][0], f[kk][1], f[kk][2], f[kk][3]);
}

// Shared memory of the fused kernel, in bf16 elements from a 1024-byte-aligned base.
template <int N>
struct Fused {
  static constexpr int kStages = 3;
  static constexpr int kPanels = N / 64;
  static constexpr int x = 0;                               // [stages][64 t][64 p]
  static constexpr int b = x + kStages * kPanel;            // [stages][panels][64 t][64 n]
  static constexpr int c = b + kStages * kPanels * kPanel;  // [stages][panels][64 t][64 n]
  static constexpr int s = c + kStages * kPanels * kPanel;  // [2][panels][64 p][64 n]
  static constexpr int scalars = s + 2 * kPanels * kPanel;  // [stages][a, dt, doc][64] (4 B)
  static constexpr int bars =
      scalars + kStages * 3 * 64 * 2;  // full, empty [stages], ready, freed [2] (8 B)
  static constexpr int bytes = (bars + (2 * kStages + 4) * 4) * 2 + 1024;
};

template <int N>
__global__ void __launch_bounds__(kFusedThreads, 1)
    fused_kernel(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_b,
                 const __grid_constant__ CUtensorMap tm_c, const SsdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Fused<N>;
  constexpr int S = L::kStages, kP = L::kPanels;
  extern __shared__ unsigned char smem_raw[];
  bf16* sm = aligned_smem(smem_raw);
  const float* scal = reinterpret_cast<const float*>(sm + L::scalars);
  const FusedBlock blk(p, reinterpret_cast<uint64_t*>(sm + L::bars), S);
  const int h = blk.h, ps = blk.ps, b = blk.b, g = blk.g, ntiles = blk.ntiles;
  const int64_t lane_off = blk.lane_off;
  uint64_t *full = blk.full, *empty = blk.empty, *ready = blk.ready, *freed = blk.freed;
  const int H = p.heads, P = p.head_dim, T = p.seqlen, wg = warpgroup();
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, q = lane & 3;
  const int r0 = warp * 16 + (lane >> 2);  // this thread's rows r0, r0 + 8 of a 64-row operand

  if (wg == 0) {
    if (threadIdx.x == 0) {
      const int* docs = reinterpret_cast<const int*>(p.ws + p.geo.docs) + int64_t(b) * p.geo.tpad;
      for (int k = 0; k < ntiles; ++k) {
        const int st = k % S, row = b * T + k * kRows;
        if (k >= S) mbar_wait(empty + st, (k / S - 1) & 1);
        mbar_arrive_expect_tx(full + st, (1 + 2 * kP) * kPanel * 2 + 3 * 64 * 4);
        tma_load_3d(sm + L::x + st * kPanel, &tm_x, ps * 64, h, row, full + st);
        for (int c = 0; c < kP; ++c) {
          tma_load_3d(sm + L::b + (st * kP + c) * kPanel, &tm_b, c * 64, g, row, full + st);
          tma_load_3d(sm + L::c + (st * kP + c) * kPanel, &tm_c, c * 64, g, row, full + st);
        }
        float* sc = reinterpret_cast<float*>(sm + L::scalars) + st * 3 * 64;
        bulk_load(sc, p.ws + p.geo.acs + lane_off + k * kRows, 256, full + st);
        bulk_load(sc + 64, p.ws + p.geo.dt + lane_off + k * kRows, 256, full + st);
        bulk_load(sc + 128, docs + k * kRows, 256, full + st);
      }
    }
    return;
  }

  // Tile k (once its stage is full); the a and document of the previous tile's last token come
  // in registers (`before`, read before that stage was released).
  struct Before {
    float a = 0.f;
    int doc = 0;
  };
  auto tile_at = [&](int k, const Before& before) {
    return TileData(p, scal + (k % S) * 3 * 64, int64_t(k) * kRows, before.a, before.doc);
  };
  auto carry = [](const TileData& t) { return Before{t.a[kRows - 1], t.doc[kRows - 1]}; };
  // Every consumer thread hands the stage back after its last read of it (an arrival releases
  // only the arriving thread's accesses).
  auto release = [&](int st) { mbar_arrive(empty + st); };

  if (wg == 1) {
    // The state: rows p = r0, r0 + 8 of this block's 64 channels, columns n = 8 nt + 2 q +
    // {0, 1}.
    float s[N / 8][4];
    const int64_t state_off = ((int64_t(b) * H + h) * P + ps * 64) * N;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 v = make_float2(0.f, 0.f);
        if (p.initial_state)
          v = *reinterpret_cast<const float2*>(p.initial_state + state_off +
                                               int64_t(r0 + 8 * half) * N + nt * 8 + 2 * q);
        s[nt][2 * half] = v.x, s[nt][2 * half + 1] = v.y;
      }
    bf16* states = reinterpret_cast<bf16*>(p.ws + p.geo.states);
    // S_m into buffer m % 2, and into the workspace's states when tile m starts a chunk.
    auto hand_over = [&](int m) {
      const int64_t t = int64_t(m) * kRows;
      bf16* out = t % p.chunk == 0
                      ? states + ((int64_t(b) * p.geo.chunks + t / p.chunk) * H + h) * P * N +
                            int64_t(ps) * 64 * N
                      : nullptr;
      wait_freed(freed, m);  // y is done with S_m-2
      hand_over_bf16<N>(s, sm + L::s + (m & 1) * kP * kPanel, ready + (m & 1), out);
    };
    hand_over(0);
    Before prev;
    for (int k = 0; k < ntiles; ++k) {
      const int st = k % S;
      mbar_wait(full + st, (k / S) & 1);
      const TileData t = tile_at(k, prev);
      const float a_last = t.a[t.last];
      const int doc_last = t.doc[t.last];
      const float keep = doc_last == t.doc_s ? ex2((a_last - t.a_prev) * kLog2e) : 0.f;
      // w_j = [doc_j = doc_L] e^(a_L - a_j) dt_j (0 past the end: dt is 0 there).
      state_step<N>(s, keep, sm + L::x + st * kPanel, sm + L::b + st * kP * kPanel, [&](int j) {
        const float2 a = *reinterpret_cast<const float2*>(t.a + j),
                     dt = *reinterpret_cast<const float2*>(t.dt + j);
        const int2 doc = *reinterpret_cast<const int2*>(t.doc + j);
        return make_float2(doc.x == doc_last ? ex2((a_last - a.x) * kLog2e) * dt.x : 0.f,
                           doc.y == doc_last ? ex2((a_last - a.y) * kLog2e) * dt.y : 0.f);
      });
      prev = carry(t);
      release(st);
      if (k + 1 < ntiles) hand_over(k + 1);
    }
    // The state after the last tile, in f32.
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t at = state_off + int64_t(r0 + 8 * half) * N + nt * 8 + 2 * q;
        const float2 v = make_float2(s[nt][2 * half], s[nt][2 * half + 1]);
        *reinterpret_cast<float2*>(p.ws + p.geo.last + at) = v;
        if (p.final_state) *reinterpret_cast<float2*>(p.final_state + at) = v;
      }
    return;
  }

  // The y warpgroup: rows i = r0, r0 + 8 of each tile, columns p = 8 nt + 2 q + {0, 1} of this
  // block's 64 channels.
  const uint4* scores = reinterpret_cast<const uint4*>(p.scratch + p.geo.scores);
  uint4 cb[4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) cb[kk] = scores[score_frag(p, b, 0, g, warp, kk, lane)];
  const int64_t x_stride = int64_t(H) * P;
  bf16* y = static_cast<bf16*>(p.y) + (int64_t(b) * T * H + h) * P + ps * 64;
  bf16* y_scan =
      p.y_scan ? static_cast<bf16*>(p.y_scan) + (int64_t(b) * T * H + h) * P + ps * 64 : nullptr;
  const float dh = p.D && !p.d_per_channel ? p.D[h] : 0.f;
  Before prev;
  for (int k = 0; k < ntiles; ++k) {
    const int st = k % S;
    mbar_wait(full + st, (k / S) & 1);
    const TileData t = tile_at(k, prev);
    float ai[2];
    int di[2];
#pragma unroll
    for (int half = 0; half < 2; ++half)
      ai[half] = t.a[r0 + 8 * half], di[half] = t.doc[r0 + 8 * half];
    // A = the scores weighted by [j <= i, doc_j = doc_i] e^(a_i - a_j) dt_j.
    uint32_t af[4][4];
    weigh_scores(af, cb, [&](int half, int j) {
      const int row = r0 + 8 * half;
      const float2 a = *reinterpret_cast<const float2*>(t.a + j),
                   dt = *reinterpret_cast<const float2*>(t.dt + j);
      const int2 doc = *reinterpret_cast<const int2*>(t.doc + j);
      return make_float2(
          j <= row && doc.x == di[half] ? ex2((ai[half] - a.x) * kLog2e) * dt.x : 0.f,
          j + 1 <= row && doc.y == di[half] ? ex2((ai[half] - a.y) * kLog2e) * dt.y : 0.f);
    });
    if (k + 1 < ntiles)  // the next tile's scores, under this tile's products
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) cb[kk] = scores[score_frag(p, b, k + 1, g, warp, kk, lane)];
    const bf16* xs = sm + L::x + st * kPanel;
    float acc[8][4], acc_s[8][4];
    tile_products<N>(acc, acc_s, af, xs, sm + L::c + st * kP * kPanel,
                     sm + L::s + (k & 1) * kP * kPanel, ready, k);
    mbar_arrive(freed + (k & 1));  // S_k read
    uint32_t out[2][8], out_scan[2][8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + 8 * half;
      const float f = di[half] == t.doc_s ? ex2((ai[half] - t.a_prev) * kLog2e) : 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int col = nt * 8 + 2 * q;
        const float v0 = acc[nt][2 * half] + f * acc_s[nt][2 * half],
                    v1 = acc[nt][2 * half + 1] + f * acc_s[nt][2 * half + 1];
        float d0 = dh, d1 = dh;
        if (p.d_per_channel) d0 = p.D[h * P + ps * 64 + col], d1 = p.D[h * P + ps * 64 + col + 1];
        const float2 xv =
            __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + sw(row, col)));
        out[half][nt] = pack_bf16(v0 + d0 * xv.x, v1 + d1 * xv.y);
        out_scan[half][nt] = pack_bf16(v0, v1);
      }
    }
    prev = carry(t);
    release(st);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r0 + 8 * half;
      if (row > t.last) continue;
      const int64_t at = (t.t0 + row) * x_stride + 2 * q;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        *reinterpret_cast<uint32_t*>(y + at + nt * 8) = out[half][nt];
        if (y_scan) *reinterpret_cast<uint32_t*>(y_scan + at + nt * 8) = out_scan[half][nt];
      }
    }
  }
#else
  (void)tm_x, (void)tm_b, (void)tm_c, (void)p;
#endif
}

template <int N>
void launch(const SsdParams& p, cudaStream_t stream) {
  launch_scores(p, false, stream);
  const int64_t rows = int64_t(p.batch) * p.seqlen;
  const CUtensorMap tx = tma_panel_map(p.x, rows, p.heads, p.head_dim, kRows);
  const CUtensorMap tb = tma_panel_map(p.B, rows, p.groups, N, kRows);
  const CUtensorMap tc = tma_panel_map(p.C, rows, p.groups, N, kRows);
  CUDA_CHECK(cudaFuncSetAttribute(fused_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Fused<N>::bytes));
  const dim3 grid(unsigned(p.heads * (p.head_dim / 64)), unsigned(p.batch));
  fused_kernel<N><<<grid, kFusedThreads, Fused<N>::bytes, stream>>>(tx, tb, tc, p);
  CUDA_CHECK(cudaGetLastError());
}

template <int N>
void launch_scores_n(const SsdParams& p, bool transposed, cudaStream_t stream) {
  const size_t smem = 2 * kRows * (N + kPad) * sizeof(bf16);
  auto kernel = transposed ? scores_kernel<N, true> : scores_kernel<N, false>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  const unsigned tiles = unsigned((p.seqlen + kRows - 1) / kRows);
  kernel<<<dim3(tiles, unsigned(p.groups), unsigned(p.batch)), kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_scores(const SsdParams& p, bool transposed, cudaStream_t stream) {
  with_d_state(p, "tile scores", [&](auto n) { launch_scores_n<n()>(p, transposed, stream); });
}

void launch_fused_fwd(const SsdParams& p, cudaStream_t stream) {
  with_d_state(p, "fused forward", [&](auto n) { launch<n()>(p, stream); });
}

}  // namespace ssd
}  // namespace braid
