// The MoE router on the GPU (moe_router.h): f32 logits, scores and weights; the same arithmetic as
// the CPU reference in f32. One thread per token picks its experts; one block per expert numbers
// its assignments in (m, k) order with a block scan (capacity slots, counts); the losses are
// per-block f64 partials added in order by one thread. No atomics: the same bits every run.
#include <cub/block/block_scan.cuh>

#include <cuda_runtime.h>

#include "layers/moe_router/moe_router.h"
#include "runtime/cuda_check.h"

namespace braid {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kLossThreads = 256, kLossBlocks = 128;

__device__ float row_lse(const float* row, int e) {
  float mx = row[0];
  for (int j = 1; j < e; ++j) mx = fmaxf(mx, row[j]);
  float s = 0.f;
  for (int j = 0; j < e; ++j) s += expf(row[j] - mx);
  return mx + logf(s);
}

__global__ void topk_kernel(const float* lg, const float* bias, int64_t m, int e, int k,
                            int sigmoid_scores, int normalize, float* sc, int32_t* ex, float* wt) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= m) return;
  const float* row = lg + i * e;
  float* s = sc + i * e;
  if (!sigmoid_scores) {
    const float lse = row_lse(row, e);
    for (int j = 0; j < e; ++j) s[j] = expf(row[j] - lse);
  } else {
    for (int j = 0; j < e; ++j) s[j] = 1.f / (1.f + expf(-row[j]));
  }
  float total = 0.f;
  for (int kk = 0; kk < k; ++kk) {  // repeated arg-max of s + bias, lower index first on ties
    int best = -1;
    float best_v = 0.f;
    for (int j = 0; j < e; ++j) {
      bool taken = false;
      for (int q = 0; q < kk; ++q) taken = taken || ex[i * k + q] == j;
      if (taken) continue;
      const float v = s[j] + (bias ? bias[j] : 0.f);
      if (best < 0 || v > best_v) best = j, best_v = v;
    }
    ex[i * k + kk] = best;
    wt[i * k + kk] = s[best];
    total += s[best];
  }
  if (normalize)
    for (int kk = 0; kk < k; ++kk) wt[i * k + kk] /= total;
}

// Block e numbers the assignments to expert e in (m, k) order: slot = its rank (or -1 past the
// capacity); counts[e] = how many there are.
__global__ void slots_kernel(const int32_t* ex, int64_t n, int64_t cap, int32_t* sl,
                             int32_t* counts) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int e = blockIdx.x;
  int64_t base = 0;
  for (int64_t c = 0; c < n; c += kScanThreads) {
    const int64_t i = c + threadIdx.x;
    const int flag = i < n && ex[i] == e ? 1 : 0;
    int before = 0, total = 0;
    Scan(tmp).ExclusiveSum(flag, before, total);
    if (flag) sl[i] = base + before < cap ? int32_t(base + before) : -1;
    base += total;
    __syncthreads();  // tmp is reused
  }
  if (threadIdx.x == 0) counts[e] = int32_t(base);
}

// partials[2 b], [2 b + 1]: block b's sums of count-weighted normalised scores and lse^2; then
// out[0], out[1] their sums in block order.
__global__ void losses_kernel(const float* lg, const float* sc, const int32_t* counts, int64_t m,
                              int e, int sigmoid_scores, double* partials) {
  __shared__ double sa[kLossThreads], sz[kLossThreads];
  double a = 0, z = 0;
  for (int64_t i = blockIdx.x * int64_t(kLossThreads) + threadIdx.x; i < m;
       i += int64_t(gridDim.x) * kLossThreads) {
    const float* s = sc + i * e;
    float norm = 1.f;
    if (sigmoid_scores) {
      norm = 0.f;
      for (int j = 0; j < e; ++j) norm += s[j];
    }
    for (int j = 0; j < e; ++j) a += double(counts[j]) * double(s[j] / norm);
    const double l = double(row_lse(lg + i * e, e));
    z += l * l;
  }
  sa[threadIdx.x] = a, sz[threadIdx.x] = z;
  __syncthreads();
  for (int off = kLossThreads / 2; off > 0; off /= 2) {
    if (threadIdx.x < off)
      sa[threadIdx.x] += sa[threadIdx.x + off], sz[threadIdx.x] += sz[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = sa[0], partials[2 * blockIdx.x + 1] = sz[0];
}

__global__ void sum_partials_kernel(const double* partials, int blocks, double* out) {
  double a = 0, z = 0;
  for (int b = 0; b < blocks; ++b) a += partials[2 * b], z += partials[2 * b + 1];
  out[0] = a, out[1] = z;
}

__global__ void backward_kernel(const float* lg, const float* sc, const int32_t* ex,
                                const int32_t* cnt, const float* gw, int64_t m, int e, int k,
                                int sigmoid_scores, int normalize, float aux_c, float z_grad,
                                float* dl) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= m) return;
  const float* s = sc + i * e;
  float* g = dl + i * e;  // first d/ds, then d/dlogits
  for (int j = 0; j < e; ++j) g[j] = 0.f;
  float total = 0.f, wdot = 0.f;
  for (int kk = 0; kk < k; ++kk) {
    total += s[ex[i * k + kk]];
    wdot += gw[i * k + kk] * s[ex[i * k + kk]];
  }
  for (int kk = 0; kk < k; ++kk) {
    const int j = ex[i * k + kk];
    g[j] += normalize ? gw[i * k + kk] / total - wdot / (total * total) : gw[i * k + kk];
  }
  if (sigmoid_scores) {
    float ssum = 0.f, pdot = 0.f;
    for (int j = 0; j < e; ++j) ssum += s[j], pdot += aux_c * float(cnt[j]) * s[j];
    for (int j = 0; j < e; ++j) g[j] += aux_c * float(cnt[j]) / ssum - pdot / (ssum * ssum);
    for (int j = 0; j < e; ++j) g[j] *= s[j] * (1.f - s[j]);
  } else {
    for (int j = 0; j < e; ++j) g[j] += aux_c * float(cnt[j]);
    float dot = 0.f;
    for (int j = 0; j < e; ++j) dot += g[j] * s[j];
    for (int j = 0; j < e; ++j) g[j] = s[j] * (g[j] - dot);
  }
  const float* row = lg + i * e;
  const float lse = row_lse(row, e);
  const float zc = z_grad * 2.f * lse / float(m);
  for (int j = 0; j < e; ++j) g[j] += zc * expf(row[j] - lse);
}

__global__ void update_bias_kernel(float* bias, int32_t* counts, int e, float rate) {
  double mean = 0;
  for (int j = 0; j < e; ++j) mean += counts[j];
  mean /= double(e);
  for (int j = 0; j < e; ++j) {
    bias[j] += rate * (mean > counts[j] ? 1.f : mean < counts[j] ? -1.f : 0.f);
    counts[j] = 0;
  }
}

__global__ void accumulate_counts_kernel(int32_t* acc, const int32_t* counts, int e) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < e) acc[j] += counts[j];
}

unsigned blocks_for(int64_t n, int threads) {
  return unsigned((n + threads - 1) / threads);
}

}  // namespace

int64_t router_loss_workspace_elems_cuda() {
  return 2 * kLossBlocks + 2;
}

void router_forward_cuda(const float* logits, const float* bias, int64_t m, int e, int k,
                         int64_t cap, bool sigmoid_scores, bool normalize, float* scores,
                         int32_t* expert, int32_t* slot, float* weight, int32_t* counts,
                         double* workspace, double* sums, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (m > 0)
    topk_kernel<<<blocks_for(m, 128), 128, 0, st>>>(logits, bias, m, e, k, sigmoid_scores,
                                                    normalize, scores, expert, weight);
  slots_kernel<<<e, kScanThreads, 0, st>>>(expert, m * k, cap, slot, counts);
  losses_kernel<<<kLossBlocks, kLossThreads, 0, st>>>(logits, scores, counts, m, e, sigmoid_scores,
                                                      workspace);
  sum_partials_kernel<<<1, 1, 0, st>>>(workspace, kLossBlocks, sums);
  CUDA_CHECK(cudaGetLastError());
}

void router_backward_cuda(const float* logits, const float* scores, const int32_t* expert,
                          const int32_t* counts, const float* dweight, int64_t m, int e, int k,
                          bool sigmoid_scores, bool normalize, float aux_c, float z_grad,
                          float* dlogits, void* stream) {
  if (m == 0) return;
  backward_kernel<<<blocks_for(m, 128), 128, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, scores, expert, counts, dweight, m, e, k, sigmoid_scores, normalize, aux_c, z_grad,
      dlogits);
  CUDA_CHECK(cudaGetLastError());
}

void router_update_bias_cuda(float* bias, int32_t* counts, int e, float rate, void* stream) {
  update_bias_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(bias, counts, e, rate);
  CUDA_CHECK(cudaGetLastError());
}

void router_accumulate_counts_cuda(int32_t* acc, const int32_t* counts, int e, void* stream) {
  accumulate_counts_kernel<<<blocks_for(e, 128), 128, 0, static_cast<cudaStream_t>(stream)>>>(
      acc, counts, e);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
