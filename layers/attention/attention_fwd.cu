// Flash attention forward on the tensor cores (mma.sync m16n8k16: bf16 operands, f32
// accumulation), for sm_80 and later.
//
// One block per (128-query tile, query head, batch row), 8 warps of 16 query rows. The block's Q
// tile goes to registers once; K and V tiles of Bc keys are double-buffered in shared memory by
// cp.async, from the first key of the tile's first document to the diagonal. Per KV tile each
// warp computes S = Q K^T (16 x Bc, f32), scales it to base 2 (x = s scale log2 e), masks where
// the tile crosses the diagonal or a document start, and runs the online softmax in registers:
//   m' = max(m, max_s x),  l' = l 2^(m - m') + sum_s 2^(x - m'),  O' = O 2^(m - m') + P V
// with P = 2^(x - m') rounded to bf16 as the A operand of P V straight from the accumulators.
// At the end O / l is written as bf16 and lse = (m + log2 l) ln 2. Query tiles are launched
// longest first (the last tile of a row has the most keys).
#include <cuda_runtime.h>

#include "layers/attention/attention_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid::attn {
namespace {

constexpr int kRows = 128, kWarps = 8, kThreads = 32 * kWarps;

template <int P, int Bc>
constexpr int fwd_smem_bytes() {
  return (kRows + 4 * Bc) * (P + 8) * 2;
}

template <int P, int Bc>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = P + 8;
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [kRows][kLd]
  bf16* sK = sQ + kRows * kLd;                   // [2][Bc][kLd]
  bf16* sV = sK + 2 * Bc * kLd;                  // [2][Bc][kLd]
  const int T = p.seqlen, H = p.heads, Hk = p.kv_heads;
  const int qb = int(gridDim.x) - 1 - int(blockIdx.x), h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hk);
  const int t0 = qb * kRows, rows = min(kRows, T - t0);
  const int64_t qs = int64_t(H) * P, ks = int64_t(Hk) * P;  // row strides
  const bf16* q = static_cast<const bf16*>(p.q) + (int64_t(b) * T + t0) * qs + h * P;
  const bf16* k = static_cast<const bf16*>(p.k) + int64_t(b) * T * ks + hk * P;
  const bf16* v = static_cast<const bf16*>(p.v) + int64_t(b) * T * ks + hk * P;
  const int32_t* seq = p.seq_idx ? p.seq_idx + int64_t(b) * T : nullptr;
  const int j0 = doc_start(seq, t0) / Bc, j1 = (t0 + rows - 1) / Bc;

  load_rows<P, kThreads>(sQ, q, qs, kRows, rows);
  load_rows<P, kThreads>(sK, k + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  load_rows<P, kThreads>(sV, v + int64_t(j0) * Bc * ks, ks, Bc, T - j0 * Bc);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  // This thread's rows (a: lane / 4, b: lane / 4 + 8) and their documents' first keys; the
  // warp's masks are needed only on tiles past its first row or before its last row's document.
  const int ta = t0 + r0 + lane / 4, tb = ta + 8;
  const int da = doc_start(seq, min(ta, T - 1)), db = doc_start(seq, min(tb, T - 1));
  const int warp_first = t0 + r0, warp_doc = __shfl_sync(0xffffffffu, db, 31);

  float o[P / 8][4];
  zero(o);
  float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;
  uint32_t qf[P / 16][4];
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
    if (j == j0) {
#pragma unroll
      for (int kk = 0; kk < P / 16; ++kk) load_a<true>(qf[kk], sQ, kLd, r0, kk * 16);
    }
    float s[Bc / 8][4];
    zero(s);
    mma_rs<Bc / 8, P / 16, true>(s, qf, sK + buf * Bc * kLd, kLd);

    const int c0 = j * Bc;
    const bool mask = c0 + Bc - 1 > warp_first || c0 < warp_doc;
    float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = c0 + nt * 8 + 2 * (lane & 3) + (e & 1);
        const bool hide = e < 2 ? (col > ta || col < da) : (col > tb || col < db);
        s[nt][e] = mask && hide ? -INFINITY : s[nt][e] * p.scale_log2;
        if (e < 2)
          xa = fmaxf(xa, s[nt][e]);
        else
          xb = fmaxf(xb, s[nt][e]);
      }
    const float na = fmaxf(ma, quad_max(xa)), nb = fmaxf(mb, quad_max(xb));
    // A row with no visible key yet keeps m = -inf: its base is 0, so every p and alpha is 0.
    const float ba = na == -INFINITY ? 0.f : na, bb = nb == -INFINITY ? 0.f : nb;
    const float alpha_a = ex2(ma - ba), alpha_b = ex2(mb - bb);
    ma = na, mb = nb;
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int nt = 0; nt < Bc / 8; ++nt) {
      s[nt][0] = ex2(s[nt][0] - ba), s[nt][1] = ex2(s[nt][1] - ba);
      s[nt][2] = ex2(s[nt][2] - bb), s[nt][3] = ex2(s[nt][3] - bb);
      sa += s[nt][0] + s[nt][1], sb += s[nt][2] + s[nt][3];
    }
    la = la * alpha_a + sa, lb = lb * alpha_b + sb;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      o[nt][0] *= alpha_a, o[nt][1] *= alpha_a;
      o[nt][2] *= alpha_b, o[nt][3] *= alpha_b;
    }
    uint32_t pf[Bc / 16][4];
    to_afrag<Bc / 8>(s, pf);
    mma_rs<P / 8, Bc / 16, false>(o, pf, sV + buf * Bc * kLd, kLd);
    __syncthreads();  // the next iteration loads into the buffer read here
  }
  la = quad_sum(la), lb = quad_sum(lb);
  // Every valid row sees at least its own key, so l >= 1; padded rows are not stored.
  const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
  store_rows<P>(o, ia, ib, sQ, r0, static_cast<bf16*>(p.o) + (int64_t(b) * T + t0) * qs + h * P, qs,
                rows);
  if ((lane & 3) == 0) {
    float* lse = p.lse + (int64_t(b) * H + h) * T;
    if (ta < T) lse[ta] = (ma + __log2f(la)) * kLn2;
    if (tb < T) lse[tb] = (mb + __log2f(lb)) * kLn2;
  }
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

}  // namespace
}  // namespace braid::attn

namespace braid {

void attention_fwd_cuda(const AttnParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.head_dim == 64)
    attn::launch_fwd<64, 128>(p, s);
  else
    attn::launch_fwd<128, 64>(p, s);
}

}  // namespace braid
