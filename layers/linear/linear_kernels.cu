// The GPU linear's bias gradient: column sums of dy [M,O], each thread one column over a block
// of 256 rows (partials [row blocks][O]), then the blocks added in order: deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

template <typename T>
__global__ void colsum_partial_kernel(const T* dy, int64_t m, int64_t o, float* partials) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= o) return;
  const int64_t r0 = int64_t(blockIdx.y) * 256, r1 = min(r0 + 256, m);
  float s = 0.f;
  for (int64_t r = r0; r < r1; ++r) s += to_float(dy[r * o + col]);
  partials[int64_t(blockIdx.y) * o + col] = s;
}

template <typename T>
__global__ void colsum_final_kernel(const float* partials, int blocks, int64_t o, T* db) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= o) return;
  float s = 0.f;
  for (int k = 0; k < blocks; ++k) s += partials[int64_t(k) * o + col];
  db[col] = from_float<T>(to_float(db[col]) + s);
}

}  // namespace

void linear_bias_grad_cuda(const void* dy, void* db, int64_t m, int64_t o, bool bf16,
                           float* partials, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int blocks = int((m + 255) / 256);
  const dim3 grid(unsigned((o + 255) / 256), unsigned(blocks));
  using B = __nv_bfloat16;
  if (bf16) {
    colsum_partial_kernel<<<grid, 256, 0, s>>>(static_cast<const B*>(dy), m, o, partials);
    colsum_final_kernel<<<grid.x, 256, 0, s>>>(partials, blocks, o, static_cast<B*>(db));
  } else {
    colsum_partial_kernel<<<grid, 256, 0, s>>>(static_cast<const float*>(dy), m, o, partials);
    colsum_final_kernel<<<grid.x, 256, 0, s>>>(partials, blocks, o, static_cast<float*>(db));
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
