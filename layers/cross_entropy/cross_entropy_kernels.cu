// Cross-entropy on the GPU: one block of 256 threads per row. Pass 1 keeps a running maximum and
// sum of exponentials per thread (f32), combined over the block; pass 2 writes the gradient. The
// row is read twice and (with the gradient) written once: memory-bound.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <type_traits>

#include "layers/cross_entropy/cross_entropy.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kThreads = 256;

// (max, sum of exp(x - max)) pairs combined.
__device__ __forceinline__ void merge(float& mx, float& se, float mx2, float se2) {
  const float m = fmaxf(mx, mx2);
  se = (mx == -FLT_MAX ? 0.f : se * __expf(mx - m)) +
       (mx2 == -FLT_MAX ? 0.f : se2 * __expf(mx2 - m));
  mx = m;
}

// The row's (max, sum of exp(x - max)) over the block, every thread getting the result.
template <typename T>
__device__ void row_max_sumexp(const T* x, int64_t v, float& mx_out, float& se_out) {
  float mx = -FLT_MAX, se = 0.f;
  for (int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float xv = to_float(x[j]);
    if (xv > mx)
      se = se * __expf(mx - xv) + 1.f, mx = xv;
    else
      se += __expf(xv - mx);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, mx, o), s2 = __shfl_xor_sync(0xffffffffu, se, o);
    merge(mx, se, m2, s2);
  }
  __shared__ float smx[kThreads / 32], sse[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smx[warp] = mx, sse[warp] = se;
  __syncthreads();
  mx = smx[0], se = sse[0];
  for (int w = 1; w < kThreads / 32; ++w) merge(mx, se, smx[w], sse[w]);
  mx_out = mx, se_out = se;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(const T* logits, const int32_t* targets, T* dlogits, float scale,
                   float* row_loss, int64_t v) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  const int32_t tgt = targets[row];
  float mx, se;
  row_max_sumexp(x, v, mx, se);
  const float lse = mx + logf(se);
  const bool bad = tgt < -1 || tgt >= v, counted = tgt >= 0 && !bad;
  if (threadIdx.x == 0) {
    row_loss[2 * row] = counted ? lse - to_float(x[tgt]) : 0.f;
    row_loss[2 * row + 1] = bad ? -1.f : counted ? 1.f : 0.f;
  }
  if (!dlogits) return;
  __syncthreads();  // x[tgt] is read above before dlogits (which may alias x) is written
  T* d = dlogits + row * v;
  for (int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float g = counted ? scale * (__expf(to_float(x[j]) - lse) - (j == tgt ? 1.f : 0.f)) : 0.f;
    d[j] = from_float<T>(g);
  }
}

// Vocabulary-parallel rows: stats [4,M] = local max, global max (the local one until the
// all-reduce), sum of exp(x - local max), target logit (0 when the target is another rank's).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_vp_stats_kernel(const T* logits, const int32_t* targets, int64_t v, int64_t v0, int64_t m,
                       float* stats) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  float mx, se;
  row_max_sumexp(x, v, mx, se);
  if (threadIdx.x == 0) {
    const int64_t t = int64_t(targets[row]) - v0;
    stats[row] = mx, stats[m + row] = mx, stats[2 * m + row] = se;
    stats[3 * m + row] = t >= 0 && t < v ? to_float(x[t]) : 0.f;
  }
}

// The sums of exponentials moved to the global maximum, before they are added over the ranks.
__global__ void ce_vp_rescale_kernel(float* stats, int64_t m) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < m) stats[2 * m + i] *= __expf(stats[i] - stats[m + i]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_vp_finish_kernel(const T* logits, const int32_t* targets, T* dlogits, float scale,
                        const float* stats, float* row_loss, int64_t v, int64_t v0, int64_t vocab,
                        int64_t m) {
  const int64_t row = blockIdx.x;
  const int32_t tgt = targets[row];
  const float lse = stats[m + row] + logf(stats[2 * m + row]);
  const bool bad = tgt < -1 || tgt >= vocab, counted = tgt >= 0 && !bad;
  if (threadIdx.x == 0) {
    row_loss[2 * row] = counted ? lse - stats[3 * m + row] : 0.f;
    row_loss[2 * row + 1] = bad ? -1.f : counted ? 1.f : 0.f;
  }
  if (!dlogits) return;
  const T* x = logits + row * v;
  T* d = dlogits + row * v;
  const int64_t t = int64_t(tgt) - v0;
  for (int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float g = counted ? scale * (__expf(to_float(x[j]) - lse) - (j == t ? 1.f : 0.f)) : 0.f;
    d[j] = from_float<T>(g);
  }
}

}  // namespace

void ce_vocab_parallel_stats_cuda(const void* logits, const int32_t* targets, int64_t m, int64_t v,
                                  int64_t v0, bool bf16, float* stats, void* stream) {
  if (m == 0) return;
  for_row_dtype(bf16, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    ce_vp_stats_kernel<T><<<unsigned(m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), targets, v, v0, m, stats);
  });
  CUDA_CHECK(cudaGetLastError());
}

void ce_vocab_parallel_rescale_cuda(float* stats, int64_t m, void* stream) {
  if (m == 0) return;
  ce_vp_rescale_kernel<<<unsigned((m + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      stats, m);
  CUDA_CHECK(cudaGetLastError());
}

void ce_vocab_parallel_finish_cuda(const void* logits, const int32_t* targets, void* dlogits,
                                   float grad_scale, const float* stats, float* row_loss, int64_t m,
                                   int64_t v, int64_t v0, int64_t vocab, bool bf16, void* stream) {
  if (m == 0) return;
  for_row_dtype(bf16, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    ce_vp_finish_kernel<T><<<unsigned(m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), targets, static_cast<T*>(dlogits), grad_scale, stats,
        row_loss, v, v0, vocab, m);
  });
  CUDA_CHECK(cudaGetLastError());
}

void cross_entropy_rows_cuda(const void* logits, const int32_t* targets, void* dlogits,
                             float grad_scale, float* row_loss, int64_t m, int64_t v, bool bf16,
                             void* stream) {
  if (m == 0) return;
  for_row_dtype(bf16, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    ce_rows_kernel<T><<<unsigned(m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), targets, static_cast<T*>(dlogits), grad_scale, row_loss, v);
  });
  CUDA_CHECK(cudaGetLastError());
}

void copy_row_losses_cuda(const float* row_loss, float* host, int64_t m, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  CUDA_CHECK(
      cudaMemcpyAsync(host, row_loss, sizeof(float) * 2 * size_t(m), cudaMemcpyDeviceToHost, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace braid
