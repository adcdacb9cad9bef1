// State passing's GPU kernels (state_passing_cuda.h): small and memory-bound; every sum is in a
// fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "layers/common/state_passing_cuda.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

using B = __nv_bfloat16;
constexpr int kLanes = 32;       // channels a block of the dt sums covers (and token lanes)
constexpr int64_t kPart = 1024;  // tokens a block of the dt sums covers

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}
unsigned blocks_for(int64_t n, int threads) {
  return unsigned((n + threads - 1) / threads);
}

__global__ void documents_kernel(const int32_t* seq, int64_t rows, int64_t t, float* packed,
                                 int32_t* starts) {
  const int64_t b = blockIdx.x;
  const int32_t* s = seq + b * t;
  int inside = 0;
  for (int64_t i = 1 + threadIdx.x; i < t; i += blockDim.x) inside |= s[i] != s[i - 1];
  inside = __syncthreads_or(inside);
  if (threadIdx.x == 0) {
    packed[b] = __int_as_float(s[0]);
    packed[rows + b] = __int_as_float(s[t - 1]);
    starts[b] = inside;
  }
}

// partial[row, part, c]: the sum of f(dt + bias) over the part's kPart tokens, as 32 token lanes
// each summing every 32nd token, then the lanes in order.
template <typename T>
__global__ void dt_sums_kernel(SpDecayArgs a, int64_t parts, float* partial) {
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x, part = blockIdx.y, row = blockIdx.z;
  const int64_t t1 = min(a.t, (part + 1) * kPart);
  float sum = 0;
  if (c < a.c) {
    const T* dt = static_cast<const T*>(a.dt) + row * a.t * a.c + c;
    const float bias = a.bias ? a.bias[c] : 0.f;
    for (int64_t i = part * kPart + threadIdx.y; i < t1; i += kLanes) {
      float x = to_float(dt[i * a.c]) + bias;
      if (a.softplus) x = x > 20.f ? x : log1pf(expf(x));
      sum += fminf(fmaxf(x, a.lo), a.hi);
    }
  }
  __shared__ float lanes[kLanes][kLanes + 1];
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || c >= a.c) return;
  float s = 0;
  for (int k = 0; k < kLanes; ++k) s += lanes[k][threadIdx.x];
  partial[(row * parts + part) * a.c + c] = s;
}

__global__ void decay_kernel(SpDecayArgs a, int64_t parts, const float* partial, float* decay) {
  const int64_t per_row = a.c * a.a_cols;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.rows * per_row) return;
  const int64_t row = i / per_row, j = i % per_row, c = j / a.a_cols;
  float sum = 0;
  for (int64_t k = 0; k < parts; ++k) sum += partial[(row * parts + k) * a.c + c];
  decay[i] = a.starts && a.starts[row] ? 0.f : expf(a.A[j] * sum);
}

template <typename T>
__global__ void pack_kernel(const T* src, int64_t n, float* dst) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = to_float(src[i]);
}

template <typename T>
__global__ void fold_kernel(const float* all, PackedMaps m, int ranks, int rank, bool entering,
                            const T* initial, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m.rows * m.per_row) return;
  // The offsets of PackedMaps (host-side functions).
  const int64_t decay_at = 2 * m.rows, state_at = decay_at + m.rows * m.decays,
                extra_at = state_at + m.rows * m.per_row, stride = extra_at + m.rows * m.per_row;
  const int64_t row = i / m.per_row;
  const int64_t d = m.decays ? row * m.decays + (i % m.per_row) / (m.per_row / m.decays) : 0;
  auto flows = [&](int q) {
    return __float_as_int(all[q * stride + m.rows + row]) ==
           __float_as_int(all[(q + 1) * stride + row]);
  };
  auto decay = [&](int q) { return m.decays ? all[q * stride + decay_at + d] : 0.f; };
  auto state = [&](int q) { return all[q * stride + state_at + i]; };
  float h;
  if (entering) {
    h = initial ? to_float(initial[i]) : 0.f;
    for (int q = 0; q < rank; ++q) h = flows(q) ? fmaf(decay(q), h, state(q)) : 0.f;
  } else {
    h = all[(ranks - 1) * stride + extra_at + i];
    for (int q = ranks - 2; q >= rank; --q)
      h = flows(q) ? fmaf(decay(q + 1), h, state(q + 1)) : 0.f;
  }
  out[i] = from_float<T>(h);
}

}  // namespace

int64_t sp_dt_parts(int64_t t) {
  return (t + kPart - 1) / kPart;
}

void sp_documents_cuda(const int32_t* seq_idx, int64_t rows, int64_t t, float* packed,
                       int32_t* starts, void* stream) {
  if (rows == 0) return;
  documents_kernel<<<unsigned(rows), 256, 0, as_stream(stream)>>>(seq_idx, rows, t, packed, starts);
  CUDA_CHECK(cudaGetLastError());
}

void sp_decays_cuda(const SpDecayArgs& a, float* partial, float* decay, void* stream) {
  if (a.rows == 0 || a.c == 0) return;
  const int64_t parts = sp_dt_parts(a.t);
  const dim3 grid(blocks_for(a.c, kLanes), unsigned(parts), unsigned(a.rows));
  const dim3 block(kLanes, kLanes);
  if (a.dt_bf16)
    dt_sums_kernel<B><<<grid, block, 0, as_stream(stream)>>>(a, parts, partial);
  else
    dt_sums_kernel<float><<<grid, block, 0, as_stream(stream)>>>(a, parts, partial);
  CUDA_CHECK(cudaGetLastError());
  const int64_t n = a.rows * a.c * a.a_cols;
  decay_kernel<<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(a, parts, partial, decay);
  CUDA_CHECK(cudaGetLastError());
}

void sp_pack_cuda(const void* src, bool src_bf16, int64_t n, float* dst, void* stream) {
  if (n == 0) return;
  if (src_bf16)
    pack_kernel<<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(static_cast<const B*>(src), n,
                                                                   dst);
  else
    pack_kernel<<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(static_cast<const float*>(src),
                                                                   n, dst);
  CUDA_CHECK(cudaGetLastError());
}

void sp_fold_cuda(const float* all, const PackedMaps& m, int ranks, int rank, bool entering,
                  const void* initial, bool out_bf16, void* out, void* stream) {
  const int64_t n = m.rows * m.per_row;
  if (n == 0) return;
  if (out_bf16)
    fold_kernel<B><<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(
        all, m, ranks, rank, entering, static_cast<const B*>(initial), static_cast<B*>(out));
  else
    fold_kernel<float><<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(
        all, m, ranks, rank, entering, static_cast<const float*>(initial),
        static_cast<float*>(out));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
