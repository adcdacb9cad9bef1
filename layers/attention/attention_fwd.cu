// Flash attention forward on the tensor cores, two kernels: on sm_90 (the default there) a
// warp-specialised one with the tensor copy engine and warpgroup products (described below, at
// fwd_kernel_tma), and for sm_80 and later one with mma.sync m16n8k16 (bf16 operands, f32
// accumulation), described here.
//
// One block per (128-query tile, query head, batch row), 4 warps of 32 query rows (two 16-row
// fragments, so every K and V fragment read from shared memory feeds two products; two blocks
// per SM). Q, K and V tiles of Bc keys are staged in shared memory by cp.async, K and V
// double-buffered, from the first key of the tile's first document to the diagonal. Per KV tile
// each warp computes S = Q K^T (32 x Bc, f32), scales it to base 2 (x = s scale log2 e), masks
// where the tile crosses the diagonal or a document start, and runs the online softmax in
// registers:
//   m' = max(m, max_s x),  l' = l 2^(m - m') + sum_s 2^(x - m'),  O' = O 2^(m - m') + P V
// with P = 2^(x - m') rounded to bf16 as the A operand of P V straight from the accumulators.
// At the end O / l is written as bf16 and lse = (m + log2 l) ln 2. Query tiles are launched
// longest first (the last tile of a row has the most keys).
#include <cuda_runtime.h>

#include "layers/attention/attention_tiles.cuh"
#include "layers/common/cuda_tma.cuh"
#include "layers/common/cuda_wgmma.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid::attn {
namespace {

constexpr int kRows = 128, kWarps = 4, kThreads = 32 * kWarps, kMt = 2;  // 16-row fragments

// The block's tile: 128 query rows of one head and batch row (launched longest first), and the
// key tiles of Bc keys it visits, j0 (the first row's document start) to j1 (the diagonal).
template <int P, int Bc>
struct QueryTile {
  int T, t0, rows, j0, j1;
  int64_t qs, ks;         // row strides of q and o, k and v
  const bf16 *q, *k, *v;  // the tile's first query row; the batch row's first key and value
  const int32_t* seq;     // the batch row's document ids (null: one document)
  bf16* o;                // the tile's first output row
  float* lse;             // the head's lse row
  __device__ explicit QueryTile(const AttnParams& p) {
    const int H = p.heads, Hk = p.kv_heads;
    const int qb = int(gridDim.x) - 1 - int(blockIdx.x), h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (H / Hk);
    T = p.seqlen, t0 = qb * kRows, rows = min(kRows, T - t0);
    qs = int64_t(H) * P, ks = int64_t(Hk) * P;
    q = static_cast<const bf16*>(p.q) + (int64_t(b) * T + t0) * qs + h * P;
    k = static_cast<const bf16*>(p.k) + int64_t(b) * T * ks + hk * P;
    v = static_cast<const bf16*>(p.v) + int64_t(b) * T * ks + hk * P;
    seq = p.seq_idx ? p.seq_idx + int64_t(b) * T : nullptr;
    j0 = doc_start(seq, t0) / Bc, j1 = (t0 + rows - 1) / Bc;
    o = static_cast<bf16*>(p.o) + (int64_t(b) * T + t0) * qs + h * P;
    lse = p.lse + (int64_t(b) * H + h) * T;
  }
};

template <int P, int Bc>
constexpr int fwd_smem_bytes() {
  return (kRows + 4 * Bc) * (P + 8) * 2;
}

template <int P, int Bc>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(const AttnParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kLd = P + 8;
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [kRows][kLd]
  bf16* sK = sQ + kRows * kLd;                   // [2][Bc][kLd]
  bf16* sV = sK + 2 * Bc * kLd;                  // [2][Bc][kLd]
  const QueryTile<P, Bc> tile(p);
  if (!p.rows.meets(tile.t0, tile.t0 + tile.rows)) return;  // no row of the tile is computed
  const int T = tile.T, t0 = tile.t0, rows = tile.rows, j0 = tile.j0, j1 = tile.j1;
  const int64_t qs = tile.qs, ks = tile.ks;
  const bf16 *q = tile.q, *k = tile.k, *v = tile.v;
  const int32_t* seq = tile.seq;

  load_rows<P, kThreads>(sQ, q, qs, kRows, rows);
  load_rows<P, kThreads>(sK, k + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  load_rows<P, kThreads>(sV, v + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16 * kMt;
  // This thread's rows (fragment m: lane / 4 and lane / 4 + 8) and their documents' first keys;
  // the warp's masks are needed only on tiles past its first row or before its last row's
  // document.
  int tr[kMt][2], ds[kMt][2];
#pragma unroll
  for (int m = 0; m < kMt; ++m)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      tr[m][e] = t0 + r0 + 16 * m + lane / 4 + 8 * e;
      ds[m][e] = doc_start(seq, min(tr[m][e], T - 1));
    }
  const int warp_first = t0 + r0, warp_doc = __shfl_sync(0xffffffffu, ds[kMt - 1][1], 31);

  float o[kMt][P / 8][4], mx[kMt][2], l[kMt][2];
#pragma unroll
  for (int m = 0; m < kMt; ++m) {
    zero(o[m]);
    mx[m][0] = mx[m][1] = -INFINITY, l[m][0] = l[m][1] = 0.f;
  }
  for (int j = j0; j <= j1; ++j) {
    const int buf = (j - j0) & 1;
    if (j < j1) {
      const int64_t next = int64_t(j + 1) * Bc * ks;
      load_rows<P, kThreads>(sK + (buf ^ 1) * Bc * kLd, k + next, ks, Bc, T - (j + 1) * Bc);
      load_rows<P, kThreads>(sV + (buf ^ 1) * Bc * kLd, v + next, ks, Bc, T - (j + 1) * Bc);
      cp_async_commit();
      cp_async_wait_pending<1>();
    } else {
      cp_async_wait();
    }
    __syncthreads();
    const bf16* tK = sK + buf * Bc * kLd;
    const bf16* tV = sV + buf * Bc * kLd;
    float s[kMt][Bc / 8][4];
#pragma unroll
    for (int m = 0; m < kMt; ++m) zero(s[m]);
#pragma unroll
    for (int kk = 0; kk < P / 16; ++kk) {
      uint32_t qa[kMt][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m) load_a<true>(qa[m], sQ, kLd, r0 + 16 * m, kk * 16);
#pragma unroll
      for (int nt = 0; nt < Bc / 8; nt += 2) {
        uint32_t bf[4];
        load_b<true>(bf, tK, kLd, nt * 8, kk * 16);
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          mma16816(s[m][nt], qa[m], bf[0], bf[1]);
          mma16816(s[m][nt + 1], qa[m], bf[2], bf[3]);
        }
      }
    }

    const int c0 = j * Bc;
    const bool mask = c0 + Bc - 1 > warp_first || c0 < warp_doc;
#pragma unroll
    for (int m = 0; m < kMt; ++m) {
      float alpha[2];
      online_softmax<Bc / 8>(s[m], mask, c0, tr[m], ds[m], p.scale_log2, mx[m], l[m], alpha);
      rescale<P / 8>(o[m], alpha);
    }
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      uint32_t pa[kMt][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
        pa[m][0] = pack_bf16(s[m][2 * kk][0], s[m][2 * kk][1]);
        pa[m][1] = pack_bf16(s[m][2 * kk][2], s[m][2 * kk][3]);
        pa[m][2] = pack_bf16(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
        pa[m][3] = pack_bf16(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nt = 0; nt < P / 8; nt += 2) {
        uint32_t bf[4];
        load_b<false>(bf, tV, kLd, nt * 8, kk * 16);
#pragma unroll
        for (int m = 0; m < kMt; ++m) {
          mma16816(o[m][nt], pa[m], bf[0], bf[1]);
          mma16816(o[m][nt + 1], pa[m], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration loads into the buffer read here
  }
  // Every valid row sees at least its own key, so l >= 1; padded rows are not stored. Each warp
  // stages its output through its own rows of sQ.
  bf16* out = tile.o;
  float* lse = tile.lse;
#pragma unroll
  for (int m = 0; m < kMt; ++m) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[m][r] = quad_sum(l[m][r]);
      inv[r] = l[m][r] > 0.f ? 1.f / l[m][r] : 0.f;
      if ((lane & 3) == 0 && tr[m][r] < T && p.rows.has(tr[m][r]))
        lse[tr[m][r]] = (mx[m][r] + __log2f(l[m][r])) * kLn2;
    }
    store_rows<P>(o[m], inv[0], inv[1], sQ, r0 + 16 * m, out, qs, rows,
                  [&](int r) { return p.rows.has(t0 + r); });
  }
}

// The Hopper forward (sm_90a), warp-specialised: one block per (128-query tile, head, batch row)
// of 3 warpgroups. Warpgroup 0 produces: one thread loads the Q tile once and the K and V tiles of
// kBcTma keys through the tensor copy engine (TMA, 128-byte swizzle) into two stages each, each
// copy completing on its stage's "full" mbarrier; the consumers hand a stage back by arriving on
// its "empty" mbarrier. Warpgroups 1 and 2 consume, 64 query rows each: per KV tile S = Q K^T (Q
// and K from shared memory), the online softmax in registers (per warp, its 16 rows, as above) and
// O += P V (P from registers, V read N-major). Within a warpgroup, S_j and P_j-1 V_j-1 are issued
// together and the softmax of S_j runs while P_j-1 V_j-1 is in flight; between the two
// warpgroups a pair of named barriers hands the tensor cores over in turn, so that one
// warpgroup's products run while the other computes its softmax (ping-pong).
constexpr int kTmaThreads = 384, kBcTma = 128;

template <int P>
constexpr int tma_smem_bytes() {
  // Q, K x 2, V x 2, 9 mbarriers, and up to 1023 bytes to align the tiles to 1024.
  return (kRows + 4 * kBcTma) * P * 2 + 9 * 8 + 1024;
}

template <int P>
__global__ void __launch_bounds__(kTmaThreads, 1)
    fwd_kernel_tma(const __grid_constant__ CUtensorMap tm_q,
                   const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int Bc = kBcTma, kPanels = P / 64, kTileBytes = Bc * P * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  bf16* sQ = reinterpret_cast<bf16*>(base);  // [kPanels][kRows][64] swizzled
  bf16* sK = sQ + kRows * P;                 // [2][kPanels][Bc][64]
  bf16* sV = sK + 2 * Bc * P;                // [2][kPanels][Bc][64]
  uint64_t* q_full = reinterpret_cast<uint64_t*>(sV + 2 * Bc * P);
  uint64_t *k_full = q_full + 1, *v_full = q_full + 3, *k_empty = q_full + 5, *v_empty = q_full + 7;
  const QueryTile<P, Bc> tile(p);
  if (!p.rows.meets(tile.t0, tile.t0 + tile.rows)) return;  // no row of the tile is computed
  const int T = tile.T, t0 = tile.t0, j0 = tile.j0, j1 = tile.j1, n_tiles = j1 - j0 + 1;
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(k_full + s, 1), mbar_init(v_full + s, 1);
      mbar_init(k_empty + s, 8), mbar_init(v_empty + s, 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  // The warpgroup's role, warp-uniform as the compiler sees it (read through a shuffle), so that
  // the products below are not taken for a divergent path (which serialises them).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);
  if (wg == 0) {
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      const int h = blockIdx.y, hk = h / (p.heads / p.kv_heads), row0 = blockIdx.z * T;
      mbar_arrive_expect_tx(q_full, kRows * P * 2);
      for (int c = 0; c < kPanels; ++c)
        tma_load_3d(sQ + c * kRows * 64, &tm_q, c * 64, h, row0 + t0, q_full);
      for (int i = 0; i < n_tiles; ++i) {
        const int st = i & 1, row = row0 + (j0 + i) * Bc;
        if (i >= 2) mbar_wait(k_empty + st, ((i >> 1) - 1) & 1);
        mbar_arrive_expect_tx(k_full + st, kTileBytes);
        for (int c = 0; c < kPanels; ++c)
          tma_load_3d(sK + (st * kPanels + c) * Bc * 64, &tm_k, c * 64, hk, row, k_full + st);
        if (i >= 2) mbar_wait(v_empty + st, ((i >> 1) - 1) & 1);
        mbar_arrive_expect_tx(v_full + st, kTileBytes);
        for (int c = 0; c < kPanels; ++c)
          tma_load_3d(sV + (st * kPanels + c) * Bc * 64, &tm_v, c * 64, hk, row, v_full + st);
      }
    }
  } else {
    setmaxnreg_inc<240>();
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int r0 = cw * 64 + warp * 16;  // this warp's first row of the tile
    const int32_t* seq = tile.seq;
    int tr[2], ds[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      tr[e] = t0 + r0 + lane / 4 + 8 * e;
      ds[e] = doc_start(seq, min(tr[e], T - 1));
    }
    const int warp_first = t0 + r0, warp_doc = __shfl_sync(0xffffffffu, ds[1], 31);

    // Descriptors of the 16-wide K slice kk: of this warpgroup's 64 rows of Q, of the K tile of
    // stage st (both K-major), and of keys 16 kk .. 16 kk + 15 of the V tile (N-major, the next 64
    // columns a panel further).
    auto q_desc = [&](int kk) {
      return wgmma_desc_sw128(sQ + ((kk / 4) * kRows + cw * 64) * 64 + (kk % 4) * 16, 16);
    };
    auto k_desc = [&](int st, int kk) {
      return wgmma_desc_sw128(sK + (st * kPanels + kk / 4) * Bc * 64 + (kk % 4) * 16, 16);
    };
    auto v_desc = [&](int st, int kk) {
      return wgmma_desc_sw128(sV + st * kPanels * Bc * 64 + kk * 16 * 64, Bc * 128);
    };
    float o[P / 8][4], s[Bc / 8][4], alpha[2], mx[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    uint32_t pf[Bc / 16][4];
    zero(o);
    auto issue_s = [&](int st) {
#pragma unroll
      for (int kk = 0; kk < P / 16; ++kk)
        wgmma_m64n128_ss<0, 0>(s, q_desc(kk), k_desc(st, kk), kk > 0);
      wgmma_commit();
    };
    auto issue_pv = [&](int st) {
#pragma unroll
      for (int kk = 0; kk < Bc / 16; ++kk) {
        if constexpr (P == 64)
          wgmma_m64n64_rs<1>(o, pf[kk], v_desc(st, kk), 1);
        else
          wgmma_m64n128_rs<1>(o, pf[kk], v_desc(st, kk), 1);
      }
      wgmma_commit();
    };
    // Hands a stage back once this warp's products that read it are done.
    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar);
    };
    // Ping-pong: warpgroup cw issues after named barrier 1 + cw, then lets the other one issue.
    // Warpgroup 1 starts; each sync meets one arrival of the other warpgroup (n_tiles each).
    if (cw == 1) named_arrive(1, 256);
    // S_i to probabilities (in pf), the row maxima and sums, and alpha; K stage st handed back.
    auto softmax = [&](int i, int st) {
      wgmma_reg_fence(s);
      release(k_empty + st);
      const int c0 = (j0 + i) * Bc;
      online_softmax<Bc / 8>(s, c0 + Bc - 1 > warp_first || c0 < warp_doc, c0, tr, ds, p.scale_log2,
                             mx, l, alpha);
    };
    // The first tile alone (S only), so that the loop body below issues and waits unconditionally
    // (products waited for on a branch the compiler cannot follow get serialised).
    mbar_wait(q_full, 0);
    mbar_wait(k_full, 0);
    named_sync(1 + cw, 256);
    wgmma_fence();
    issue_s(0);
    if (cw == 0 || n_tiles > 1) named_arrive(2 - cw, 256);
    wgmma_wait<0>();
    softmax(0, 0);
    to_afrag<Bc / 8>(s, pf);
    for (int i = 1; i < n_tiles; ++i) {
      const int st = i & 1, prev = st ^ 1;
      mbar_wait(k_full + st, (i >> 1) & 1);
      named_sync(1 + cw, 256);
      wgmma_reg_fence(s);
      wgmma_fence();
      issue_s(st);
      scale_rows<P / 8>(o, alpha);  // O holds P_i-2 V_i-2 (waited below); scale before P_i-1 V_i-1
      mbar_wait(v_full + prev, ((i - 1) >> 1) & 1);
      wgmma_reg_fence(o);
      wgmma_fence();
      issue_pv(prev);
      if (cw == 0 || i + 1 < n_tiles) named_arrive(2 - cw, 256);
      wgmma_wait<1>();
      softmax(i, st);
      wgmma_wait<0>();
      wgmma_reg_fence(o);
      release(v_empty + prev);
      to_afrag<Bc / 8>(s, pf);
    }
    scale_rows<P / 8>(o, alpha);
    mbar_wait(v_full + ((n_tiles - 1) & 1), ((n_tiles - 1) >> 1) & 1);
    wgmma_reg_fence(o);
    wgmma_fence();
    issue_pv((n_tiles - 1) & 1);
    wgmma_wait<0>();
    wgmma_reg_fence(o);

    // Every valid row sees at least its own key, so l >= 1; rows past T or outside p.rows are not
    // stored. Each quad writes 16 contiguous bytes of a row per column tile.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] = quad_sum(l[r]);
      inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
      if ((lane & 3) == 0 && tr[r] < T && p.rows.has(tr[r]))
        tile.lse[tr[r]] = (mx[r] + __log2f(l[r])) * kLn2;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (tr[r] >= T || !p.rows.has(tr[r])) continue;
      bf16* out = tile.o + (tr[r] - t0) * tile.qs + 2 * (lane & 3);
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt)
        *reinterpret_cast<uint32_t*>(out + nt * 8) =
            pack_bf16(o[nt][2 * r] * inv[r], o[nt][2 * r + 1] * inv[r]);
    }
  }
#else
  (void)tm_q, (void)tm_k, (void)tm_v, (void)p;
#endif
}

template <int P, int Bc>
void launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<P, Bc>();
  CUDA_CHECK(
      cudaFuncSetAttribute(fwd_kernel<P, Bc>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen + kRows - 1) / kRows, p.heads, p.batch);
  fwd_kernel<P, Bc><<<grid, kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

template <int P>
void launch_fwd_tma(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = tma_smem_bytes<P>();
  const int64_t rows = int64_t(p.batch) * p.seqlen;
  const CUtensorMap tq = tma_panel_map(p.q, rows, p.heads, P, kRows);
  const CUtensorMap tk = tma_panel_map(p.k, rows, p.kv_heads, P, kBcTma);
  const CUtensorMap tv = tma_panel_map(p.v, rows, p.kv_heads, P, kBcTma);
  CUDA_CHECK(
      cudaFuncSetAttribute(fwd_kernel_tma<P>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen + kRows - 1) / kRows, p.heads, p.batch);
  fwd_kernel_tma<P><<<grid, kTmaThreads, smem, stream>>>(tq, tk, tv, p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace braid::attn

namespace braid {

void attention_fwd_cuda(const AttnParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (p.use_wgmma && major == 9) {
    if (p.head_dim == 64)
      attn::launch_fwd_tma<64>(p, s);
    else
      attn::launch_fwd_tma<128>(p, s);
  } else if (p.head_dim == 64) {
    attn::launch_fwd<64, 64>(p, s);
  } else {
    attn::launch_fwd<128, 32>(p, s);
  }
}

}  // namespace braid
