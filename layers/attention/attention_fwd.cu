// Flash attention forward on the tensor cores (mma.sync m16n8k16: bf16 operands, f32
// accumulation), for sm_80 and later.
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

// The Hopper forward (sm_90a): the same algorithm with warpgroup products. One block per
// (128-query tile, head, batch row) of 2 warpgroups, 64 query rows each. Q, K and V tiles are
// staged by cp.async in the interleaved layout of cuda_wgmma.cuh (K and V double-buffered); per KV
// tile a warpgroup computes S = Q K^T (64 x Bc) with Q in registers and K in shared memory, runs
// the online softmax in registers (per warp, its 16 rows, as above) and adds P V with P from
// registers and V read N-major (transposed by the descriptor).
constexpr int kWgThreads = 256;

template <int P, int Bc>
constexpr int wg_smem_bytes() {
  return (kRows + 4 * Bc) * P * 2;
}

template <int P, int Bc>
__global__ void __launch_bounds__(kWgThreads, 1) fwd_kernel_wgmma(const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [kRows x P], interleaved
  bf16* sK = sQ + kRows * P;                     // [2][Bc x P]
  bf16* sV = sK + 2 * Bc * P;                    // [2][Bc x P]
  const QueryTile<P, Bc> tile(p);
  if (!p.rows.meets(tile.t0, tile.t0 + tile.rows)) return;  // no row of the tile is computed
  const int T = tile.T, t0 = tile.t0, rows = tile.rows, j0 = tile.j0, j1 = tile.j1;
  const int64_t qs = tile.qs, ks = tile.ks;
  const bf16 *q = tile.q, *k = tile.k, *v = tile.v;
  const int32_t* seq = tile.seq;

  load_rows_cm<P, kWgThreads>(sQ, q, qs, kRows, rows);
  load_rows_cm<P, kWgThreads>(sK, k + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  load_rows_cm<P, kWgThreads>(sV, v + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  int tr[2], ds[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    tr[e] = t0 + r0 + lane / 4 + 8 * e;
    ds[e] = doc_start(seq, min(tr[e], T - 1));
  }
  const int warp_first = t0 + r0, warp_doc = __shfl_sync(0xffffffffu, ds[1], 31);
  // Descriptors: K-major Q and K (LBO one core matrix, SBO a row of core matrices), N-major V.
  constexpr uint32_t kCore = 128, kRowOfCores = P / 8 * 128;

  // Software pipeline: iteration j issues S_j = Q K_j^T and O += P_j-1 V_j-1 together, runs the
  // softmax of S_j while the second product is in flight, then rescales O once it is done. K_j+1
  // and V_j are loaded during iteration j into the buffers that iteration j - 1 finished with.
  // The first S and the last P V are issued alone (prologue, epilogue), so the loop body issues
  // its products unconditionally.
  float o[P / 8][4], s[Bc / 8][4], alpha[2];
  uint32_t pf[Bc / 16][4], qf[P / 16][4];
  zero(o);
  float mx[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  auto issue_s = [&](int j) {
    const bf16* tK = sK + ((j - j0) & 1) * Bc * P;
#pragma unroll
    for (int kk = 0; kk < P / 16; ++kk) {
      const uint64_t bd = wgmma_desc(tK + kk * 16 * 8, kCore, kRowOfCores);
      if constexpr (Bc == 64)
        wgmma_m64n64_rs<0>(s, qf[kk], bd, kk > 0);
      else
        wgmma_m64n128_rs<0>(s, qf[kk], bd, kk > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int j) {
    const bf16* tV = sV + ((j - j0) & 1) * Bc * P;
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      // Keys 16 kk .. 16 kk + 15 are two rows of core matrices of the V tile.
      const uint64_t bd = wgmma_desc(tV + kk * 2 * (P / 8) * 64, kRowOfCores, kCore);
      if constexpr (P == 64)
        wgmma_m64n64_rs<1>(o, pf[kk], bd, 1);
      else
        wgmma_m64n128_rs<1>(o, pf[kk], bd, 1);
    }
    wgmma_commit();
  };
  // S_j -> probabilities (in s), the row maxima and sums, and alpha.
  auto softmax = [&](int j) {
    const int c0 = j * Bc;
    const bool mask = c0 + Bc - 1 > warp_first || c0 < warp_doc;
    online_softmax<Bc / 8>(s, mask, c0, tr, ds, p.scale_log2, mx, l, alpha);
  };
  auto stage = [&](int j) {  // tiles of iteration j are in; start the loads of iteration j + 1
    cp_async_wait();
    fence_proxy_async();
    __syncthreads();
    if (j + 1 <= j1)
      load_rows_cm<P, kWgThreads>(sK + ((j + 1 - j0) & 1) * Bc * P, k + int64_t(j + 1) * Bc * ks,
                                  ks, Bc, T - (j + 1) * Bc);
    if (j > j0 && j <= j1)
      load_rows_cm<P, kWgThreads>(sV + ((j - j0) & 1) * Bc * P, v + int64_t(j) * Bc * ks, ks, Bc,
                                  T - j * Bc);
    cp_async_commit();
  };

  stage(j0);
  // This warp's 16 rows of Q, as register A operands of S = Q K^T (ldmatrix from the interleaved
  // tile: each lane names one 16-byte row of a core matrix).
#pragma unroll
  for (int kk = 0; kk < P / 16; ++kk)
    ldsm4(qf[kk], sQ + cm_offset<P>(r0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
  wgmma_reg_fence(s);
  wgmma_fence();
  issue_s(j0);
  wgmma_wait<0>();
  wgmma_reg_fence(s);
  softmax(j0);
  to_afrag<Bc / 8>(s, pf);
  for (int j = j0 + 1; j <= j1; ++j) {
    stage(j);
    wgmma_reg_fence(s);
    wgmma_reg_fence(o);
    wgmma_fence();
    issue_s(j);
    issue_pv(j - 1);
    wgmma_wait<1>();
    wgmma_reg_fence(s);
    softmax(j);
    wgmma_wait<0>();  // P_j-1 V_j-1 is in O: rescale, then P_j may replace P_j-1
    wgmma_reg_fence(o);
    rescale<P / 8>(o, alpha);
    to_afrag<Bc / 8>(s, pf);
  }
  stage(j1 + 1);
  wgmma_reg_fence(o);
  wgmma_fence();
  issue_pv(j1);
  wgmma_wait<0>();
  wgmma_reg_fence(o);
  __syncthreads();  // the K buffers stage the output
  // Stage the output through padded rows (the row stride of store_rows) in the K buffers.
  bf16* out = tile.o;
  float* lse = tile.lse;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    if ((lane & 3) == 0 && tr[r] < T && p.rows.has(tr[r]))
      lse[tr[r]] = (mx[r] + __log2f(l[r])) * kLn2;
  }
  store_rows<P>(o, inv[0], inv[1], sK, r0, out, qs, rows,
                [&](int r) { return p.rows.has(t0 + r); });
#else
  (void)p;
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

template <int P, int Bc>
void launch_fwd_wgmma(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = wg_smem_bytes<P, Bc>();
  CUDA_CHECK(cudaFuncSetAttribute(fwd_kernel_wgmma<P, Bc>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen + kRows - 1) / kRows, p.heads, p.batch);
  fwd_kernel_wgmma<P, Bc><<<grid, kWgThreads, smem, stream>>>(p);
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
      attn::launch_fwd_wgmma<64, 128>(p, s);
    else
      attn::launch_fwd_wgmma<128, 128>(p, s);
  } else if (p.head_dim == 64) {
    attn::launch_fwd<64, 64>(p, s);
  } else {
    attn::launch_fwd<128, 32>(p, s);
  }
}

}  // namespace braid
