// Embedding on the GPU. Forward: one warp per token copies its row (zeros outside this rank's
// rows). Backward, deterministic without atomics: the (row, position) pairs are sorted by row
// with a stable radix sort (cub), so each row's positions come in increasing order; runs of one
// row are found (run-length encoding) and one block per run adds its dy rows in that order, in
// f32, to dW (+=). Memory: the sort's keys and values, the runs, cub's scratch (the workspace).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cub/cub.cuh>

#include "layers/embedding/embedding.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

template <typename T>
__global__ void embedding_fwd_kernel(const int32_t* tok, const T* w, T* y, int64_t n, int64_t d,
                                     int64_t v0, int64_t rows) {
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (i >= n) return;
  const int64_t r = int64_t(tok[i]) - v0;
  const bool in = r >= 0 && r < rows;
  for (int64_t j = threadIdx.x & 31; j < d; j += 32)
    y[i * d + j] = in ? w[r * d + j] : from_float<T>(0.f);
}

__global__ void keys_kernel(const int32_t* tok, int64_t n, int64_t v0, int64_t rows, int32_t* keys,
                            int32_t* vals) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = int64_t(tok[i]) - v0;
  keys[i] = r >= 0 && r < rows ? int32_t(r) : int32_t(rows);  // rows: not this rank's
  vals[i] = int32_t(i);
}

template <typename G, typename T>
__global__ void accumulate_kernel(const int32_t* unique, const int32_t* counts,
                                  const int32_t* offsets, const int32_t* num_runs,
                                  const int32_t* positions, const G* dy, T* dw, int64_t d,
                                  int64_t rows) {
  // Block (run, column block): each thread one column of one vocabulary row, its rows' dy added
  // in position order (loads unrolled so that a frequent token's long run keeps many in flight).
  const int run = blockIdx.x;
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (run >= *num_runs || unique[run] >= rows || j >= d) return;
  const int64_t key = unique[run], first = offsets[run], count = counts[run];
  float s = 0.f;
#pragma unroll 8
  for (int64_t k = 0; k < count; ++k) s += to_float(dy[int64_t(positions[first + k]) * d + j]);
  dw[key * d + j] = from_float<T>(to_float(dw[key * d + j]) + s);
}

int key_bits(int64_t rows) {
  int bits = 1;
  while ((int64_t(1) << bits) <= rows) ++bits;
  return bits;
}

// The workspace's parts (bytes, each 256-aligned): 7 int arrays of n, the run count, cub scratch.
struct Layout {
  size_t ints = 0, temp = 0, total = 0;
};
Layout layout(int64_t n, int64_t rows) {
  size_t sort = 0, rle = 0, scan = 0;
  const int bits = key_bits(rows);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort, static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(n), 0, bits));
  CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(
      nullptr, rle, static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(n)));
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), int(n)));
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  Layout l;
  l.ints = up(size_t(n) * sizeof(int32_t));
  l.temp = up(std::max(sort, std::max(rle, scan)));
  l.total = 7 * l.ints + 256 + l.temp;
  return l;
}

}  // namespace

int64_t embedding_backward_workspace_bytes_cuda(int64_t n, int64_t rows) {
  return int64_t(layout(n, rows).total);
}

void embedding_forward_cuda(const int32_t* tokens, const void* w, void* y, int64_t n, int64_t d,
                            int64_t v0, int64_t rows, bool bf16, void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = unsigned((n + 7) / 8);
  if (bf16)
    embedding_fwd_kernel<<<blocks, 256, 0, s>>>(tokens, static_cast<const __nv_bfloat16*>(w),
                                                static_cast<__nv_bfloat16*>(y), n, d, v0, rows);
  else
    embedding_fwd_kernel<<<blocks, 256, 0, s>>>(tokens, static_cast<const float*>(w),
                                                static_cast<float*>(y), n, d, v0, rows);
  CUDA_CHECK(cudaGetLastError());
}

void embedding_backward_cuda(const int32_t* tokens, const void* dy, void* dw, int64_t n, int64_t d,
                             int64_t v0, int64_t rows, bool dy_bf16, bool dw_bf16, void* workspace,
                             void* stream) {
  if (n == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Layout l = layout(n, rows);
  char* base = static_cast<char*>(workspace);
  auto ints = [&](int k) { return reinterpret_cast<int32_t*>(base + k * l.ints); };
  int32_t *keys = ints(0), *vals = ints(1), *keys_sorted = ints(2), *positions = ints(3),
          *unique = ints(4), *counts = ints(5), *offsets = ints(6);
  int32_t* num_runs = reinterpret_cast<int32_t*>(base + 7 * l.ints);
  void* temp = base + 7 * l.ints + 256;
  size_t temp_bytes = l.temp;
  keys_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(tokens, n, v0, rows, keys, vals);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, keys_sorted, vals, positions,
                                             int(n), 0, key_bits(rows), s));
  temp_bytes = l.temp;
  CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(temp, temp_bytes, keys_sorted, unique, counts,
                                                num_runs, int(n), s));
  temp_bytes = l.temp;
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, offsets, int(n), s));
  const unsigned threads = unsigned(d < 256 ? (d + 31) / 32 * 32 : 256);
  using B = __nv_bfloat16;
  const dim3 g(unsigned(n), unsigned((d + threads - 1) / threads));
  if (dy_bf16 && dw_bf16)
    accumulate_kernel<<<g, threads, 0, s>>>(unique, counts, offsets, num_runs, positions,
                                            static_cast<const B*>(dy), static_cast<B*>(dw), d,
                                            rows);
  else if (dy_bf16)
    accumulate_kernel<<<g, threads, 0, s>>>(unique, counts, offsets, num_runs, positions,
                                            static_cast<const B*>(dy), static_cast<float*>(dw), d,
                                            rows);
  else
    accumulate_kernel<<<g, threads, 0, s>>>(unique, counts, offsets, num_runs, positions,
                                            static_cast<const float*>(dy), static_cast<float*>(dw),
                                            d, rows);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
