// Flash attention backward on the tensor cores (mma.sync m16n8k16: bf16 operands, f32
// accumulation), for sm_80 and later. Three launches:
//   prep:  D_t = do_t . o_t and lse_t log2(e) per query row (0 past T), into the workspace.
//   main:  one block per (128-key tile, KV head, batch row), 8 warps of 16 keys. K and V stay in
//          shared memory; for each query head of the KV head's group, in order, and each 64-row
//          query tile that sees the keys (from the diagonal to the end of the last key's
//          document), Q, dO, lse and D are double-buffered by cp.async and each warp computes,
//          transposed (keys as rows, x = scale log2 e q.k):
//            P^T = 2^(x - lse log2 e)  (masked: 0)      dV += P^T dO
//            dP^T = V dO^T   dS^T = P^T (dP^T - D)      dK += dS^T Q
//          then dS^T (bf16) goes through shared memory for dQ_tile = dS K (64 x P), which is
//          added into the f32 accumulator of the query tile. dK and dV sum every query head of
//          the group in registers and are written once (dK times the scale): no atomics.
//   final: dq = scale dq_acc, as bf16.
// The additions into the zeroed dq accumulator are f32 reductions (red, fire and forget). In
// deterministic mode (the default) they happen in a fixed order: last key tile first (the
// diagonal's, which reaches the query tile first). The tile j waits until the query tile's
// counter says that the jhi - j key tiles after it (jhi: the query tile's last key tile) have
// added theirs; it counts itself after a fence at the start of its next step (the fence then
// finds the reductions done). Key tiles are launched last tile first, so a
// block only waits for blocks launched before it. Otherwise the order is the hardware's
// (faster, order-dependent rounding).
#include <cuda_runtime.h>

#include "layers/attention/attention_tiles.cuh"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

namespace braid::attn {
namespace {

constexpr int kKeys = 128, kRows = kAttnBwdRows, kWarps = 8, kThreads = 32 * kWarps;
constexpr int kLdS = kRows + 8;  // dS^T tile [kKeys][kLdS]

template <int P>
constexpr int bwd_smem_bytes() {
  return (2 * kKeys + 4 * kRows) * (P + 8) * 2 + kKeys * kLdS * 2 + 4 * kRows * 4;
}

// One warp per query row: D_t and lse_t log2(e) for t < Tq (0 past T).
template <int P>
__global__ void prep_kernel(const AttnParams p) {
  const int warps = blockDim.x / 32, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5);  // (b, h, t) over Tq
  const int64_t tq = p.geo.tq;
  if (row >= int64_t(p.batch) * p.heads * tq) return;
  const int t = int(row % tq), h = int((row / tq) % p.heads), b = int(row / (tq * p.heads));
  float d = 0.f, l = 0.f;
  if (t < p.seqlen) {
    const int64_t off = ((int64_t(b) * p.seqlen + t) * p.heads + h) * P;
    const bf16* go = static_cast<const bf16*>(p.dout) + off;
    const bf16* o = static_cast<const bf16*>(p.o) + off;
    for (int i = 2 * lane; i < P; i += 64) {
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(go + i));
      const float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + i));
      d += a.x * c.x + a.y * c.y;
    }
    d = warp_sum(d);
    l = p.lse[(int64_t(b) * p.heads + h) * p.seqlen + t] * kLog2e;
  }
  if (lane == 0) {
    p.ws[p.geo.delta + row] = d;
    p.ws[p.geo.lse2 + row] = l;
  }
}

__device__ __forceinline__ int ld_acquire(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// dst[0, 1] += (a, b) without a return value (one vector reduction on sm_90).
__device__ __forceinline__ void red_add2(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(a), "f"(b)
               : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

template <int P, bool kDet>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(const AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = P + 8;
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);             // [kKeys][kLd]
  bf16* sV = sK + kKeys * kLd;                              // [kKeys][kLd]
  bf16* sQ = sV + kKeys * kLd;                              // [2][kRows][kLd]
  bf16* sO = sQ + 2 * kRows * kLd;                          // dO, [2][kRows][kLd]
  bf16* sS = sO + 2 * kRows * kLd;                          // dS^T, [kKeys][kLdS]
  float* sL = reinterpret_cast<float*>(sS + kKeys * kLdS);  // lse log2 e, [2][kRows]
  float* sD = sL + 2 * kRows;                               // D, [2][kRows]

  const int T = p.seqlen, H = p.heads, Hk = p.kv_heads, group = H / Hk;
  const int j = int(gridDim.x) - 1 - int(blockIdx.x), hk = blockIdx.y, b = blockIdx.z;
  const int s0 = j * kKeys, keys = min(kKeys, T - s0);
  const int64_t qs = int64_t(H) * P, ks = int64_t(Hk) * P;
  const int32_t* seq = p.seq_idx ? p.seq_idx + int64_t(b) * T : nullptr;
  const int64_t kv_off = (int64_t(b) * T + s0) * ks + hk * P;
  load_rows<P, kThreads>(sK, static_cast<const bf16*>(p.k) + kv_off, ks, kKeys, keys);
  load_rows<P, kThreads>(sV, static_cast<const bf16*>(p.v) + kv_off, ks, kKeys, keys);
  cp_async_commit();

  // Query tiles that see these keys: from the diagonal to the end of the last key's document.
  const int i_lo = s0 / kRows, i_hi = (doc_end(seq, s0 + keys - 1, T) - 1) / kRows;
  const int n_i = i_hi - i_lo + 1, steps = group * n_i;
  const int64_t tq = p.geo.tq;
  auto issue = [&](int step, int buf) {
    const int h = hk * group + step / n_i, t0 = (i_lo + step % n_i) * kRows;
    const int64_t off = (int64_t(b) * T + t0) * qs + h * P;
    load_rows<P, kThreads>(sQ + buf * kRows * kLd, static_cast<const bf16*>(p.q) + off, qs, kRows,
                           T - t0);
    load_rows<P, kThreads>(sO + buf * kRows * kLd, static_cast<const bf16*>(p.dout) + off, qs,
                           kRows, T - t0);
    const int64_t lane_off = (int64_t(b) * H + h) * tq + t0;
    const int i = threadIdx.x;
    if (i < kRows / 4)
      cp_async16(sL + buf * kRows + 4 * i, p.ws + p.geo.lse2 + lane_off + 4 * i, true);
    else if (i < kRows / 2)
      cp_async16(sD + buf * kRows + 4 * (i - kRows / 4),
                 p.ws + p.geo.delta + lane_off + 4 * (i - kRows / 4), true);
    cp_async_commit();
  };
  issue(0, 0);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  // This thread's keys (a: lane / 4, b: lane / 4 + 8) are seen by queries [s, end of s's
  // document); keys past T by none. The warp needs masks only on query tiles that start before
  // its last key or reach past its first key's document.
  const int sa = s0 + r0 + lane / 4, sb = sa + 8;
  const int ea = sa < T ? doc_end(seq, sa, T) : 0, eb = sb < T ? doc_end(seq, sb, T) : 0;
  const int warp_last = s0 + r0 + 15;
  const int warp_end = min(__shfl_sync(0xffffffffu, ea, 0), __shfl_sync(0xffffffffu, eb, 31));

  float dk[P / 8][4], dv[P / 8][4];
  zero(dk);
  zero(dv);
  int* prev_sem = nullptr;  // the query tile's counter of the previous step
  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    if (step + 1 < steps) {
      issue(step + 1, buf ^ 1);
      cp_async_wait_pending<1>();
    } else {
      cp_async_wait();
    }
    __syncthreads();
    // The previous step's additions were all issued before this barrier: count them now, a
    // step late, so the fence waits for reductions long done instead of stalling the block.
    if (kDet && threadIdx.x == 0 && prev_sem) {
      __threadfence();
      atomicAdd(prev_sem, 1);
    }
    const int h = hk * group + step / n_i, i = i_lo + step % n_i, t0 = i * kRows;
    const bf16* tQ = sQ + buf * kRows * kLd;
    const bf16* tO = sO + buf * kRows * kLd;
    const float* tL = sL + buf * kRows;
    const float* tD = sD + buf * kRows;

    float s[kRows / 8][4];
    zero(s);
    mma_ss<kRows / 8, P, true, true>(s, sK, kLd, r0, 0, tQ, kLd, 0);
    const bool mask =
        t0 < warp_last || t0 + kRows > warp_end || !p.rows.covers(t0, min(t0 + kRows, T));
    if (mask) {
#pragma unroll
      for (int nt = 0; nt < kRows / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * (lane & 3) + (e & 1), t = t0 + c;
          const bool hide = (e < 2 ? (t < sa || t >= ea) : (t < sb || t >= eb)) || !p.rows.has(t);
          s[nt][e] = hide ? 0.f : ex2(s[nt][e] * p.scale_log2 - tL[c]);
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < kRows / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[nt][e] = ex2(s[nt][e] * p.scale_log2 - tL[nt * 8 + 2 * (lane & 3) + (e & 1)]);
    }
    uint32_t pf[kRows / 16][4];
    to_afrag<kRows / 8>(s, pf);
    mma_rs<P / 8, kRows / 16, false>(dv, pf, tO, kLd);

    float dp[kRows / 8][4];
    zero(dp);
    mma_ss<kRows / 8, P, true, true>(dp, sV, kLd, r0, 0, tO, kLd, 0);
#pragma unroll
    for (int nt = 0; nt < kRows / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - tD[nt * 8 + 2 * (lane & 3) + (e & 1)];
    to_afrag<kRows / 8>(s, pf);
    mma_rs<P / 8, kRows / 16, false>(dk, pf, tQ, kLd);
    {
      const int r = r0 + lane / 4, c = 2 * (lane & 3);
#pragma unroll
      for (int t = 0; t < kRows / 16; ++t) {
        *reinterpret_cast<uint32_t*>(sS + r * kLdS + 16 * t + c) = pf[t][0];
        *reinterpret_cast<uint32_t*>(sS + (r + 8) * kLdS + 16 * t + c) = pf[t][1];
        *reinterpret_cast<uint32_t*>(sS + r * kLdS + 16 * t + 8 + c) = pf[t][2];
        *reinterpret_cast<uint32_t*>(sS + (r + 8) * kLdS + 16 * t + 8 + c) = pf[t][3];
      }
    }
    __syncthreads();
    // dQ tile (kRows x P) = dS K: warp w takes rows 16 (w % 4) and columns (w / 4) P / 2.
    constexpr int kCols = P / 2;
    const int qr0 = (warp & 3) * 16, qc0 = (warp >> 2) * kCols;
    float dq[kCols / 8][4];
    zero(dq);
    mma_ss<kCols / 8, kKeys, false, false>(dq, sS, kLdS, qr0, 0, sK + qc0, kLd, 0);
    float* acc = p.ws + p.geo.dq_acc + ((int64_t(b) * H + h) * tq + t0) * P + qc0;
    const int ra = qr0 + lane / 4, c = 2 * (lane & 3);
    int* sem = reinterpret_cast<int*>(p.ws + p.geo.sem) + (int64_t(b) * H + h) * (tq / kRows) + i;
    if (kDet) {
      const int before = min(t0 + kRows - 1, T - 1) / kKeys - j;  // key tiles that add first
      if (threadIdx.x == 0)
        while (ld_acquire(sem) != before) {
        }
      __syncthreads();
    }
#pragma unroll
    for (int nt = 0; nt < kCols / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        red_add2(acc + (ra + 8 * half) * P + nt * 8 + c, dq[nt][2 * half], dq[nt][2 * half + 1]);
    prev_sem = sem;
  }
  __syncthreads();  // sQ and sO are reused to stage dK and dV; the last additions were issued
  if (kDet && threadIdx.x == 0 && prev_sem) {
    __threadfence();
    atomicAdd(prev_sem, 1);
  }
  bf16* dst_k = static_cast<bf16*>(p.dk) + kv_off;
  bf16* dst_v = static_cast<bf16*>(p.dv) + kv_off;
  auto all = [](int) { return true; };
  store_rows<P>(dk, p.scale, p.scale, sQ, r0, dst_k, ks, keys, all);
  store_rows<P>(dv, 1.f, 1.f, sO, r0, dst_v, ks, keys, all);
}

// dq[b, t, h] = scale dq_acc[b, h, t] as bf16, 8 elements per thread.
template <int P>
__global__ void final_kernel(const AttnParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b, t, h, vec)
  constexpr int kVec = P / 8;
  if (i >= int64_t(p.batch) * p.seqlen * p.heads * kVec) return;
  const int vec = int(i % kVec), h = int((i / kVec) % p.heads);
  const int64_t bt = i / (int64_t(kVec) * p.heads);
  const int t = int(bt % p.seqlen), b = int(bt / p.seqlen);
  const float* src =
      p.ws + p.geo.dq_acc + ((int64_t(b) * p.heads + h) * p.geo.tq + t) * P + vec * 8;
  const float4 x = *reinterpret_cast<const float4*>(src);
  const float4 y = *reinterpret_cast<const float4*>(src + 4);
  uint4 out;
  out.x = pack_bf16(x.x * p.scale, x.y * p.scale), out.y = pack_bf16(x.z * p.scale, x.w * p.scale);
  out.z = pack_bf16(y.x * p.scale, y.y * p.scale), out.w = pack_bf16(y.z * p.scale, y.w * p.scale);
  *reinterpret_cast<uint4*>(static_cast<bf16*>(p.dq) + i * 8) = out;
}

template <int P>
void launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads * p.geo.tq;
  prep_kernel<P><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaMemsetAsync(p.ws + p.geo.dq_acc, 0, sizeof(float) * size_t(rows) * P, stream));
  if (p.deterministic)
    CUDA_CHECK(cudaMemsetAsync(
        p.ws + p.geo.sem, 0, sizeof(int) * size_t(p.batch) * p.heads * (p.geo.tq / kRows), stream));
  constexpr int smem = bwd_smem_bytes<P>();
  auto kernel = p.deterministic ? bwd_kernel<P, true> : bwd_kernel<P, false>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seqlen + kKeys - 1) / kKeys, p.kv_heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  const int64_t vecs = int64_t(p.batch) * p.seqlen * p.heads * (P / 8);
  final_kernel<P><<<unsigned((vecs + 255) / 256), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace braid::attn

namespace braid {

void attention_bwd_cuda(const AttnParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.head_dim == 64)
    attn::launch_bwd<64>(p, s);
  else
    attn::launch_bwd<128>(p, s);
}

}  // namespace braid
