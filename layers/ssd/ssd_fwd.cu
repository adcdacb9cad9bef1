// SSD forward on the GPU: the chunked algorithm in four kernels (the notation of ssd_cuda.h).
//   1. prep, per (chunk, head, batch row): dt = clamp(softplus(dt_raw + bias)) and a_i, the
//      cumulative sum of dt A over the chunk (a block scan), saved for the backward.
//   2. chunk_state, per (chunk, head, 64 x 64 tile of [P,N]): the chunk's own state term
//      sum_j w_j x_j B_j^T (w_j = [doc_j = doc_L] e^(a_L - a_j) dt_j) as one tensor-core product
//      X^T (w B) with K = Q (the weights scale the staged B tile, rounded to bf16 as the product's
//      operand).
//   3. state_pass, per (head, batch row, 1024 elements of the state): S_c+1 = keep_c S_c + term,
//      in f32 over the chunks in order; S_c is stored in bf16 (the next kernel's operand).
//   4. chunk_scan, per (chunk, head, 64-token tile i): the state term e^(a_i) C_i S_c^T (K = N,
//      S_c streamed in 64-column slices), then for every tile j <= i the scores C_i B_j^T
//      (K = N), masked and weighted by e^(a_i - a_j) dt_j in registers and multiplied by x_j
//      (K = 64) without leaving the registers; D x_i is added and y written. The backward runs it
//      again with dy to get dy_i . (y_i - D x_i) instead of y.
// FLOPs per (chunk, head): 2 Q P N (chunk_state) + 2 Q N P (state term) + Q^2 (N + P) (the causal
// half of the tile products, counted per tile: the diagonal tiles are computed whole).
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
}

template <bool kGrad>
__global__ __launch_bounds__(kThreads) void chunk_state_kernel(SsdParams p) {
  constexpr int ld = 64 + kPad;
  __shared__ __align__(16) bf16 us[kRows * ld];
  __shared__ __align__(16) bf16 vs[kRows * ld];
  __shared__ float w[kRows];
  __shared__ TokenInfo info;
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int P = p.head_dim, N = p.d_state, G = p.groups, g = h / (p.heads / G);
  const int p0 = (blockIdx.y / (N / 64)) * 64, n0 = (blockIdx.y % (N / 64)) * 64;
  const int64_t c0 = int64_t(c) * p.chunk;
  const int64_t last = min(c0 + p.chunk, int64_t(p.seqlen)) - 1;
  const int64_t lane_off = (int64_t(b) * p.heads + h) * p.geo.tpad;
  const float a_last = p.ws[p.geo.acs + lane_off + last];
  // Forward: w_j = [doc_j = doc_L] e^(a_L - a_j) dt_j. Backward (with dy and C): the gradient
  // of S_c from the chunk's outputs, w_i = [doc_i = doc of S_c] e^(a_i).
  const int doc_ref = kGrad ? doc_at(p, b, c == 0 ? 0 : c0 - 1) : doc_at(p, b, last);
  const bf16* U = static_cast<const bf16*>(kGrad ? p.dy : p.x);
  const bf16* V = static_cast<const bf16*>(kGrad ? p.C : p.B);
  float acc[8][4];
  zero(acc);
  for (int64_t t0 = c0; t0 <= last; t0 += kRows) {
    const int valid = int(min(int64_t(kRows), last + 1 - t0));
    load_tile<64>(us, U + ((int64_t(b) * p.seqlen + t0) * p.heads + h) * P + p0,
                  int64_t(p.heads) * P, kRows, valid);
    load_tile<64>(vs, V + ((int64_t(b) * p.seqlen + t0) * G + g) * N + n0, int64_t(G) * N, kRows,
                  valid);
    cp_async_commit();
    load_info(info, p, b, h, t0);
    __syncthreads();
    if (threadIdx.x < kRows) {
      const int j = threadIdx.x;
      const bool on = j < valid && info.doc[j] == doc_ref;
      w[j] = !on     ? 0.f
             : kGrad ? ex2(info.a[j] * kLog2e)
                     : ex2((a_last - info.a[j]) * kLog2e) * info.dt[j];
    }
    cp_async_wait();
    __syncthreads();
    for (int e = threadIdx.x; e < kRows * 32; e += kThreads) {
      uint32_t* q = reinterpret_cast<uint32_t*>(vs + (e / 32) * ld + (e % 32) * 2);
      *q = scale_bf16x2(*q, w[e / 32]);
    }
    __syncthreads();
    mma_ss<8, 64, false, false>(acc, us, ld, warp_row0(), 0, vs, ld, 0);
    __syncthreads();
  }
  float* out = p.ws + p.geo.local + ((int64_t(b) * p.geo.chunks + c) * p.heads + h) * P * N;
  const int l = lane_id(), r = p0 + warp_row0() + (l >> 2);
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
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
  const float* local = p.ws + p.geo.local;
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
    bf16* dstates = reinterpret_cast<bf16*>(p.ws + p.geo.dstates);
    float4 g =
        p.dfinal_state ? *reinterpret_cast<const float4*>(p.dfinal_state + state_off) : zero4;
    for (int c = nc - 1; c >= 0; --c) {
      store4_bf16(dstates + chunk_off(c), g);
      const float4 s =
          c + 1 < nc ? load4_bf16(states + chunk_off(c + 1)) : *reinterpret_cast<float4*>(last);
      const float kap = block_sum(g.x * s.x + g.y * s.y + g.z * s.z + g.w * s.w, sh);
      if (threadIdx.x == 0)
        p.ws[p.geo.kappa + ((int64_t(b) * p.heads + h) * nc + c) * p.geo.pass_blocks + blockIdx.x] =
            kap;
      g = link4(chunk_keep(p, b, acs, c), g,
                *reinterpret_cast<const float4*>(local + chunk_off(c)));
    }
    if (p.dinitial_state) *reinterpret_cast<float4*>(p.dinitial_state + state_off) = g;
  }
}

template <int P, int N, bool kGrad>
__global__ __launch_bounds__(kThreads) void chunk_scan_kernel(SsdParams p) {
  constexpr int ldn = N + kPad, ldp = P + kPad, lds = 64 + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* cs = reinterpret_cast<bf16*>(smem);  // C rows i          [64][ldn]
  bf16* bs = cs + kRows * ldn;               // B rows j          [64][ldn]
  bf16* xs = bs + kRows * ldn;               // x rows j          [64][ldp]
  bf16* ss = xs + kRows * ldp;               // S_c [P][64 columns]; at the end dy rows i
  TokenInfo& ri = *reinterpret_cast<TokenInfo*>(ss + P * lds);
  TokenInfo& cj = *(&ri + 1);
  const int c = blockIdx.x / p.heads, h = blockIdx.x % p.heads, b = blockIdx.z;
  const int mb = p.chunk / kRows - 1 - blockIdx.y;  // the longest rows first
  const int64_t c0 = int64_t(c) * p.chunk, ti = c0 + mb * kRows;
  if (ti >= p.seqlen) return;
  const int T = p.seqlen, H = p.heads, G = p.groups, g = h / (H / G);
  const int valid_i = int(min(int64_t(kRows), T - ti));
  const int64_t x_stride = int64_t(H) * P, bc_stride = int64_t(G) * N;
  auto x_at = [&](const void* base, int64_t t) {
    return static_cast<const bf16*>(base) + ((int64_t(b) * T + t) * H + h) * P;
  };
  auto bc_at = [&](const void* base, int64_t t) {
    return static_cast<const bf16*>(base) + ((int64_t(b) * T + t) * G + g) * N;
  };
  load_tile<N>(cs, bc_at(p.C, ti), bc_stride, kRows, valid_i);
  cp_async_commit();
  load_info(ri, p, b, h, ti);
  const int sd = doc_at(p, b, c == 0 ? 0 : c0 - 1);
  const int l = lane_id(), r0 = warp_row0() + (l >> 2);
  float acc[P / 8][4];
  zero(acc);
  if (c > 0 || p.initial_state) {
    const bf16* S = reinterpret_cast<const bf16*>(p.ws + p.geo.states) +
                    ((int64_t(b) * p.geo.chunks + c) * H + h) * P * N;
    for (int k0 = 0; k0 < N; k0 += 64) {
      load_tile<64>(ss, S + k0, N, P, P);
      cp_async_commit();
      cp_async_wait();
      __syncthreads();
      mma_ss<P / 8, 64, true, true>(acc, cs, ldn, warp_row0(), k0, ss, lds, 0);
      __syncthreads();
    }
  }
  cp_async_wait();
  __syncthreads();
  {
    const float f0 = ri.doc[r0] == sd ? ex2(ri.a[r0] * kLog2e) : 0.f;
    const float f1 = ri.doc[r0 + 8] == sd ? ex2(ri.a[r0 + 8] * kLog2e) : 0.f;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt)
      acc[nt][0] *= f0, acc[nt][1] *= f0, acc[nt][2] *= f1, acc[nt][3] *= f1;
  }
  for (int jb = 0; jb <= mb; ++jb) {
    const int64_t tj = c0 + jb * kRows;
    const int valid_j = int(min(int64_t(kRows), T - tj));
    load_tile<N>(bs, bc_at(p.B, tj), bc_stride, kRows, valid_j);
    load_tile<P>(xs, x_at(p.x, tj), x_stride, kRows, valid_j);
    cp_async_commit();
    load_info(cj, p, b, h, tj);
    cp_async_wait();
    __syncthreads();
    float s[8][4];
    zero(s);
    mma_ss<8, N, true, true>(s, cs, ldn, warp_row0(), 0, bs, ldn, 0);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + (e >> 1) * 8, col = nt * 8 + 2 * (l & 3) + (e & 1);
        const bool on = (jb < mb || col <= row) && ri.doc[row] == cj.doc[col];
        s[nt][e] = on ? s[nt][e] * ex2((ri.a[row] - cj.a[col]) * kLog2e) * cj.dt[col] : 0.f;
      }
    uint32_t pf[4][4];
    to_afrag(s, pf);
    mma_rs<P / 8, 4, false>(acc, pf, xs, ldp);
    __syncthreads();
  }
  if (!kGrad) {  // y = acc + D x (xs holds the rows i: the last tile j was i)
    bf16* y = static_cast<bf16*>(p.y);
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = r0 + half * 8, col = nt * 8 + 2 * (l & 3);
        if (row >= valid_i) continue;
        float d0 = 0.f, d1 = 0.f;
        if (p.D) {
          d0 = p.d_per_channel ? p.D[h * P + col] : p.D[h];
          d1 = p.d_per_channel ? p.D[h * P + col + 1] : p.D[h];
        }
        const float2 xv =
            __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xs + row * ldp + col));
        *reinterpret_cast<uint32_t*>(y + ((int64_t(b) * T + ti + row) * H + h) * P + col) =
            pack_bf16(acc[nt][2 * half] + d0 * xv.x, acc[nt][2 * half + 1] + d1 * xv.y);
      }
  } else {  // R_i = dy_i . (y_i - D x_i)
    load_tile<P>(ss, x_at(p.dy, ti), x_stride, kRows, valid_i);
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
            *reinterpret_cast<const __nv_bfloat162*>(ss + row * ldp + nt * 8 + 2 * (l & 3)));
        v += d.x * acc[nt][2 * half] + d.y * acc[nt][2 * half + 1];
      }
      v = quad_sum(v);
      if ((l & 3) == 0) p.ws[p.geo.r + (int64_t(b) * H + h) * p.geo.tpad + ti + row] = v;
    }
  }
}

template <int P, int N>
void launch_scan(const SsdParams& p, bool grad, cudaStream_t stream) {
  const size_t smem =
      (2 * kRows * (N + kPad) + kRows * (P + kPad) + P * (64 + kPad)) * sizeof(bf16) +
      2 * sizeof(TokenInfo);
  auto kernel = grad ? chunk_scan_kernel<P, N, true> : chunk_scan_kernel<P, N, false>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  kernel<<<dim3(unsigned(p.geo.chunks * p.heads), unsigned(p.chunk / kRows), unsigned(p.batch)),
           kThreads, smem, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_chunk_state(const SsdParams& p, bool grad, cudaStream_t stream) {
  const dim3 grid(unsigned(p.geo.chunks * p.heads), unsigned(p.head_dim / 64 * p.d_state / 64),
                  unsigned(p.batch));
  if (grad)
    chunk_state_kernel<true><<<grid, kThreads, 0, stream>>>(p);
  else
    chunk_state_kernel<false><<<grid, kThreads, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

void launch_state_pass(const SsdParams& p, bool grad, cudaStream_t stream) {
  const dim3 grid(unsigned(p.geo.pass_blocks), unsigned(p.heads), unsigned(p.batch));
  if (grad)
    state_pass_kernel<true><<<grid, 256, 0, stream>>>(p);
  else
    state_pass_kernel<false><<<grid, 256, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

void launch_chunk_scan(const SsdParams& p, bool grad, cudaStream_t stream) {
  const int key = p.head_dim * 1000 + p.d_state;
  switch (key) {
    case 64064:
      return launch_scan<64, 64>(p, grad, stream);
    case 64128:
      return launch_scan<64, 128>(p, grad, stream);
    case 64256:
      return launch_scan<64, 256>(p, grad, stream);
    case 128064:
      return launch_scan<128, 64>(p, grad, stream);
    case 128128:
      return launch_scan<128, 128>(p, grad, stream);
    case 128256:
      return launch_scan<128, 256>(p, grad, stream);
    default:
      BRAID_FAIL("ssd (CUDA): no kernel for head dim ", p.head_dim, ", d_state ", p.d_state);
  }
}

}  // namespace ssd

void ssd_fwd_cuda(const SsdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  ssd::prep_kernel<<<dim3(unsigned(p.geo.chunks * p.heads), 1, unsigned(p.batch)), p.chunk, 0,
                     stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
  ssd::launch_chunk_state(p, false, stream);
  ssd::launch_state_pass(p, false, stream);
  ssd::launch_chunk_scan(p, false, stream);
}

}  // namespace braid
