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
#include "layers/common/cuda_tma.cuh"
#include "layers/common/cuda_wgmma.cuh"
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

// The block's dq additions of a query tile are done: one more on its counter, by one thread after a
// barrier that follows every thread's additions. The release orders them (cumulatively, through
// the barrier) before the count, as the waiting block's acquire load expects.
__device__ __forceinline__ void count_added(int* sem) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(sem) : "memory");
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

// The queries that see this thread's two keys of a 16-key fragment starting at key k0 (rows
// lane / 4 and lane / 4 + 8): [s, end of s's document); keys past T are seen by none.
struct KeysSeen {
  int sa, sb, ea, eb;
  __device__ KeysSeen(const int32_t* seq, int k0, int T) {
    sa = k0 + (threadIdx.x & 31) / 4, sb = sa + 8;
    ea = sa < T ? doc_end(seq, sa, T) : 0, eb = sb < T ? doc_end(seq, sb, T) : 0;
  }
  // The first document end among the fragment's keys (past it a query tile needs masks).
  __device__ int warp_end() const {
    return min(__shfl_sync(0xffffffffu, ea, 0), __shfl_sync(0xffffffffu, eb, 31));
  }
};

// A 16-key x 8 NT-query fragment of raw scores s (queries t0 + column) becomes
// P^T = 2^(s scale log2 e - lse_t log2 e) (tL: lse log2 e of the tile's queries), 0 where `mask`
// (tiles that cross the diagonal, a document end or the computed rows) hides the pair.
template <int NT>
__device__ __forceinline__ void probs_t(float (&s)[NT][4], bool mask, int t0, const float* tL,
                                        const KeysSeen& ks, const AttnParams& p) {
  const int lane = threadIdx.x & 31;
  if (mask) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * (lane & 3) + (e & 1), t = t0 + c;
        const bool hide =
            (e < 2 ? (t < ks.sa || t >= ks.ea) : (t < ks.sb || t >= ks.eb)) || !p.rows.has(t);
        s[nt][e] = hide ? 0.f : ex2(s[nt][e] * p.scale_log2 - tL[c]);
      }
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = ex2(s[nt][e] * p.scale_log2 - tL[nt * 8 + 2 * (lane & 3) + (e & 1)]);
  }
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

  // Query tiles that see these keys: from the diagonal to the end of the last key's document
  // (under context parallelism only those with rows computed).
  const int i_lo = s0 / kRows, i_hi = (doc_end(seq, s0 + keys - 1, T) - 1) / kRows;
  const TileRuns tiles(p.rows, i_lo, i_hi, kRows);  // those with rows computed
  const int n_i = tiles.count(), steps = group * n_i;
  const int64_t tq = p.geo.tq;
  auto issue = [&](int step, int buf) {
    const int h = hk * group + step / n_i, t0 = tiles.tile(step % n_i) * kRows;
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
  if (steps > 0) issue(0, 0);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  // This thread's keys (a: lane / 4, b: lane / 4 + 8) are seen by queries [s, end of s's
  // document); keys past T by none. The warp needs masks only on query tiles that start before
  // its last key or reach past its first key's document.
  const KeysSeen keys_seen(seq, s0 + r0, T);
  const int warp_last = s0 + r0 + 15, warp_end = keys_seen.warp_end();

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
      count_added(prev_sem);
    }
    const int h = hk * group + step / n_i, i = tiles.tile(step % n_i), t0 = i * kRows;
    const bf16* tQ = sQ + buf * kRows * kLd;
    const bf16* tO = sO + buf * kRows * kLd;
    const float* tL = sL + buf * kRows;
    const float* tD = sD + buf * kRows;

    float s[kRows / 8][4];
    zero(s);
    mma_ss<kRows / 8, P, true, true>(s, sK, kLd, r0, 0, tQ, kLd, 0);
    probs_t(s, t0 < warp_last || t0 + kRows > warp_end || !p.rows.covers(t0, min(t0 + kRows, T)),
            t0, tL, keys_seen, p);
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
  if (steps == 0) cp_async_wait();  // K and V (no query tile has rows computed)
  __syncthreads();  // sQ and sO are reused to stage dK and dV; the last additions were issued
  if (kDet && threadIdx.x == 0 && prev_sem) {
    count_added(prev_sem);
  }
  bf16* dst_k = static_cast<bf16*>(p.dk) + kv_off;
  bf16* dst_v = static_cast<bf16*>(p.dv) + kv_off;
  auto all = [](int) { return true; };
  store_rows<P>(dk, p.scale, p.scale, sQ, r0, dst_k, ks, keys, all);
  store_rows<P>(dv, 1.f, 1.f, sO, r0, dst_v, ks, keys, all);
}

// The Hopper backward (sm_90a), warp-specialised like the forward: one block per (128-key tile,
// KV head, batch row) of 2 warpgroups (a third, producer, warpgroup would cap the registers at
// 168, too few for dK and dV), steps in the order above. Thread 0 loads K and V once and, one step
// ahead, each step's Q and dO (TMA, 128-byte swizzle) and lse log2 e and D (bulk copies) into two
// stages on mbarriers. Warpgroup c owns keys 64 c .. 64 c + 63 and per
// step computes, keys as rows,
//   S^T = K Q^T and dP^T = V dO^T (operands from shared memory), P^T and dS^T in registers,
//   dV += P^T dO and dK += dS^T Q (P^T, dS^T from registers; dO and Q read N-major);
// both write dS^T (bf16) to a shared tile (one per stage), and after a barrier of the two the dQ
// tile dS K (dS read M-major, K N-major) is computed, warpgroup c columns c P / 2 .. (c + 1) P / 2
// - 1, and added into the f32 accumulator as in the sm_80 kernel (deterministic order by
// default). For P = 64 the K operand of a warpgroup starts 64 bytes into the swizzled rows; the
// swizzle applies to the whole address, as for the K slices of a K-major operand.
constexpr int kBwdTmaThreads = 256;

template <int P>
constexpr int bwd_tma_smem_bytes() {
  // K, V; Q and dO x 2 stages; dS^T x 2; lse and D x 2; 5 mbarriers; slack to align to 1024.
  return (2 * kKeys * P + 4 * kRows * P + 2 * kKeys * kRows) * 2 + 4 * kRows * 4 + 5 * 8 + 1024;
}

template <int P, bool kDet>
__global__ void __launch_bounds__(kBwdTmaThreads, 1)
    bwd_kernel_tma(const __grid_constant__ CUtensorMap tm_q,
                   const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v,
                   const __grid_constant__ CUtensorMap tm_do, const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kRows == 64, "a dS^T row is one 128-byte swizzled panel");
  constexpr int kPanels = P / 64, kDqCols = P / 2;  // dQ columns per warpgroup
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  bf16* sK = reinterpret_cast<bf16*>(base);                      // [kPanels][kKeys][64], swizzled
  bf16* sV = sK + kKeys * P;                                     // [kPanels][kKeys][64]
  bf16* sQ = sV + kKeys * P;                                     // [2][kPanels][kRows][64]
  bf16* sO = sQ + 2 * kRows * P;                                 // dO, [2][kPanels][kRows][64]
  bf16* sS = sO + 2 * kRows * P;                                 // dS^T, [2][kKeys][kRows]
  float* sL = reinterpret_cast<float*>(sS + 2 * kKeys * kRows);  // lse log2 e, [2][kRows]
  float* sD = sL + 2 * kRows;                                    // D, [2][kRows]
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(sD + 2 * kRows);
  uint64_t *full = kv_full + 1, *empty = kv_full + 3;

  const int T = p.seqlen, H = p.heads, group = H / p.kv_heads;
  const int j = int(gridDim.x) - 1 - int(blockIdx.x), hk = blockIdx.y, b = blockIdx.z;
  const int s0 = j * kKeys, keys = min(kKeys, T - s0);
  const int32_t* seq = p.seq_idx ? p.seq_idx + int64_t(b) * T : nullptr;
  const int i_lo = s0 / kRows, i_hi = (doc_end(seq, s0 + keys - 1, T) - 1) / kRows;
  const TileRuns tiles(p.rows, i_lo, i_hi, kRows);  // those with rows computed
  const int n_i = tiles.count(), steps = group * n_i;
  const int64_t tq = p.geo.tq;
  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int st = 0; st < 2; ++st) mbar_init(full + st, 1), mbar_init(empty + st, 8);
    mbar_init_fence();
  }
  __syncthreads();
  // Thread 0 also loads: K and V, and each step's tiles one step ahead, into the stage that the
  // step before last handed back.
  const int row0 = b * T;
  auto load_step = [&](int step) {
    const int st = step & 1, h = hk * group + step / n_i, t0 = tiles.tile(step % n_i) * kRows;
    if (step >= 2) mbar_wait(empty + st, ((step >> 1) - 1) & 1);
    mbar_arrive_expect_tx(full + st, 2 * kRows * P * 2 + 2 * kRows * 4);
    for (int c = 0; c < kPanels; ++c) {
      tma_load_3d(sQ + (st * kPanels + c) * kRows * 64, &tm_q, c * 64, h, row0 + t0, full + st);
      tma_load_3d(sO + (st * kPanels + c) * kRows * 64, &tm_do, c * 64, h, row0 + t0, full + st);
    }
    const int64_t lane_off = (int64_t(b) * H + h) * tq + t0;
    bulk_load(sL + st * kRows, p.ws + p.geo.lse2 + lane_off, kRows * 4, full + st);
    bulk_load(sD + st * kRows, p.ws + p.geo.delta + lane_off, kRows * 4, full + st);
  };
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(kv_full, 2 * kKeys * P * 2);
    for (int c = 0; c < kPanels; ++c) {
      tma_load_3d(sK + c * kKeys * 64, &tm_k, c * 64, hk, row0 + s0, kv_full);
      tma_load_3d(sV + c * kKeys * 64, &tm_v, c * 64, hk, row0 + s0, kv_full);
    }
    if (steps > 0) load_step(0);
  }
  const int cw = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // warp-uniform
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int r0 = cw * 64 + warp * 16;  // this warp's first key of the tile
  const KeysSeen keys_seen(seq, s0 + r0, T);
  const int warp_last = s0 + r0 + 15, warp_end = keys_seen.warp_end();
  // Descriptors: K slice kk of rows row0 .. row0 + 63 of a K-major [kPanels][rows][64] tile; rows
  // 16 kk .. 16 kk + 15 (the K of the product) of an N- or M-major [kPanels][rows][64] tile.
  auto k_major = [](const bf16* tile, int rows, int row0, int kk) {
    return wgmma_desc_sw128(tile + ((kk / 4) * rows + row0) * 64 + (kk % 4) * 16, 16);
  };
  auto mn_major = [](const bf16* tile, int rows, int kk) {
    return wgmma_desc_sw128(tile + kk * 16 * 64, rows * 128);
  };
  // Hands a stage back once this warp's products that read it are done.
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // Issues d (64 keys x P) += A (keys x the step's queries, register fragments) tile (queries x
  // P, read N-major).
  auto add_product = [&](float(&d)[P / 8][4], const uint32_t(&a)[kRows / 16][4], const bf16* tile) {
    wgmma_reg_fence(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      if constexpr (P == 64)
        wgmma_m64n64_rs<1>(d, a[kk], mn_major(tile, kRows, kk), 1);
      else
        wgmma_m64n128_rs<1>(d, a[kk], mn_major(tile, kRows, kk), 1);
    }
    wgmma_commit();
  };
  float dk[P / 8][4], dv[P / 8][4];
  zero(dk);
  zero(dv);
  int* prev_sem = nullptr;  // the query tile's counter of the previous step
  mbar_wait(kv_full, 0);
  for (int step = 0; step < steps; ++step) {
    const int st = step & 1, h = hk * group + step / n_i, i = tiles.tile(step % n_i),
              t0 = i * kRows;
    const bf16* tQ = sQ + st * kRows * P;
    const bf16* tO = sO + st * kRows * P;
    bf16* tS = sS + st * kKeys * kRows;
    if (threadIdx.x == 0 && step + 1 < steps) load_step(step + 1);
    mbar_wait(full + st, (step >> 1) & 1);
    float s[kRows / 8][4], dp[kRows / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < P / 16; ++kk)
      wgmma_m64n64_ss<0, 0>(s, k_major(sK, kKeys, cw * 64, kk), k_major(tQ, kRows, 0, kk), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < P / 16; ++kk)
      wgmma_m64n64_ss<0, 0>(dp, k_major(sV, kKeys, cw * 64, kk), k_major(tO, kRows, 0, kk), kk > 0);
    wgmma_commit();
    int* sem = reinterpret_cast<int*>(p.ws + p.geo.sem) + (int64_t(b) * H + h) * (tq / kRows) + i;
    if (kDet) {  // wait for the key tiles that add to this query tile first, under the products
      const int before = min(t0 + kRows - 1, T - 1) / kKeys - j;
      if (lane == 0)
        while (ld_acquire(sem) != before) {
        }
      __syncwarp();
    }
    wgmma_wait<1>();  // S^T is in
    wgmma_reg_fence(s);
    probs_t(s, t0 < warp_last || t0 + kRows > warp_end || !p.rows.covers(t0, min(t0 + kRows, T)),
            t0, sL + st * kRows, keys_seen, p);
    uint32_t pf[kRows / 16][4];
    to_afrag<kRows / 8>(s, pf);
    add_product(dv, pf, tO);
    wgmma_wait<1>();  // dP^T is in (dV may still run)
    wgmma_reg_fence(dp);
    const float* tD = sD + st * kRows;
#pragma unroll
    for (int nt = 0; nt < kRows / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - tD[nt * 8 + 2 * (lane & 3) + (e & 1)];
    uint32_t sf[kRows / 16][4];
    to_afrag<kRows / 8>(s, sf);
    add_product(dk, sf, tQ);
    {  // dS^T into the swizzled tile: key row r holds queries c, c + 1 at chunk c / 8 ^ r % 8
      auto put = [&](int r, int c, uint32_t v) {
        *reinterpret_cast<uint32_t*>(tS + r * 64 + ((((c >> 3) ^ (r & 7)) << 3) | (c & 7))) = v;
      };
      const int r = r0 + lane / 4, c = 2 * (lane & 3);
#pragma unroll
      for (int t = 0; t < kRows / 16; ++t) {
        put(r, 16 * t + c, sf[t][0]);
        put(r + 8, 16 * t + c, sf[t][1]);
        put(r, 16 * t + 8 + c, sf[t][2]);
        put(r + 8, 16 * t + 8 + c, sf[t][3]);
      }
    }
    fence_proxy_async();
    __syncthreads();  // both dS^T halves are in; the previous step's additions were issued
    if (kDet && threadIdx.x == 0 && prev_sem) {  // count them, a step late (as in sm_80)
      count_added(prev_sem);
    }
    float dq[kDqCols / 8][4];
    const int col0 = cw * kDqCols, col_panel = col0 / 64 * kKeys * 64 + col0 % 64;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint64_t a = mn_major(tS, kKeys, kk), bk = mn_major(sK + col_panel, kKeys, kk);
      if constexpr (kDqCols == 64)
        wgmma_m64n64_ss<1, 1>(dq, a, bk, kk > 0);
      else
        wgmma_m64n32_ss<1, 1>(dq, a, bk, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_reg_fence(dq);
    wgmma_reg_fence(dk);
    wgmma_reg_fence(dv);
    release(empty + st);
    float* acc =
        p.ws + p.geo.dq_acc + ((int64_t(b) * H + h) * tq + t0 + warp * 16) * P + cw * kDqCols;
    const int ra = lane / 4, c = 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < kDqCols / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        red_add2(acc + (ra + 8 * half) * P + nt * 8 + c, dq[nt][2 * half], dq[nt][2 * half + 1]);
    prev_sem = sem;
  }
  __syncthreads();  // the last additions were issued
  if (kDet && threadIdx.x == 0 && prev_sem) {
    count_added(prev_sem);
  }
  const int64_t ks = int64_t(p.kv_heads) * P, kv_off = (int64_t(b) * T + s0) * ks + hk * P;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + lane / 4 + 8 * half;
    if (r >= keys) continue;
    bf16* dst_k = static_cast<bf16*>(p.dk) + kv_off + r * ks + 2 * (lane & 3);
    bf16* dst_v = static_cast<bf16*>(p.dv) + kv_off + r * ks + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dst_k + nt * 8) =
          pack_bf16(dk[nt][2 * half] * p.scale, dk[nt][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dst_v + nt * 8) =
          pack_bf16(dv[nt][2 * half], dv[nt][2 * half + 1]);
    }
  }
#else
  (void)tm_q, (void)tm_k, (void)tm_v, (void)tm_do, (void)p;
#endif
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
void launch_bwd(const AttnParams& p, bool hopper, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads * p.geo.tq;
  prep_kernel<P><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaMemsetAsync(p.ws + p.geo.dq_acc, 0, sizeof(float) * size_t(rows) * P, stream));
  if (p.deterministic)
    CUDA_CHECK(cudaMemsetAsync(
        p.ws + p.geo.sem, 0, sizeof(int) * size_t(p.batch) * p.heads * (p.geo.tq / kRows), stream));
  const dim3 grid((p.seqlen + kKeys - 1) / kKeys, p.kv_heads, p.batch);
  if (hopper) {
    constexpr int smem = bwd_tma_smem_bytes<P>();
    const int64_t rows = int64_t(p.batch) * p.seqlen;
    const CUtensorMap tq = tma_panel_map(p.q, rows, p.heads, P, kRows);
    const CUtensorMap tk = tma_panel_map(p.k, rows, p.kv_heads, P, kKeys);
    const CUtensorMap tv = tma_panel_map(p.v, rows, p.kv_heads, P, kKeys);
    const CUtensorMap tdo = tma_panel_map(p.dout, rows, p.heads, P, kRows);
    auto kernel = p.deterministic ? bwd_kernel_tma<P, true> : bwd_kernel_tma<P, false>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kBwdTmaThreads, smem, stream>>>(tq, tk, tv, tdo, p);
  } else {
    constexpr int smem = bwd_smem_bytes<P>();
    auto kernel = p.deterministic ? bwd_kernel<P, true> : bwd_kernel<P, false>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, stream>>>(p);
  }
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
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const bool hopper = p.use_wgmma && major == 9;
  if (p.head_dim == 64)
    attn::launch_bwd<64>(p, hopper, s);
  else
    attn::launch_bwd<128>(p, hopper, s);
}

}  // namespace braid
