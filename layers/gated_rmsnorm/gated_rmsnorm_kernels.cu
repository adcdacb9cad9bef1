// Gated RMSNorm on the GPU (math in gated_rmsnorm.h); without a gate (z null) it is the plain
// RMSNorm of layers/rmsnorm/ (one group). Forward and backward give one warp to each
// (row, group): a first pass over the group's elements sums g^2 (forward) or (w dy) . g
// (backward) in f32, a warp reduction finishes it, and a second pass (from L1/L2) writes y or
// dx and dz. dw = sum over rows of dy g r is column-parallel: a thread owns a column of a
// 256-row block and writes its partial sum; a second kernel adds the blocks in order
// (deterministic, no atomics). Memory-bound: the forward reads x and z and writes y (6 bytes per
// bf16 element); the backward reads x, z, dy twice (the dw pass) and writes dx and dz.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "layers/common/cuda_fast_math.cuh"
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "layers/gated_rmsnorm/gated_rmsnorm_cuda.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

constexpr int kWarps = 8;           // warps (row groups) per block
constexpr int kRowsPerBlock = 256;  // rows per dw partial sum (gated_rmsnorm_row_blocks)

// silu(z) and, with the derivative's factor, silu'(z) = s (1 + z (1 - s)); 1 and 0 without a gate.
__device__ __forceinline__ float gate(const GatedNormParams& p, float zv) {
  return p.z ? zv * sigmoid(zv) : 1.f;
}

// x * silu(z) (x without a gate) at element i.
template <typename T>
__device__ __forceinline__ float gated(const GatedNormParams& p, const T* x, const T* z,
                                       int64_t i) {
  return to_float(x[i]) * gate(p, z ? to_float(z[i]) : 0.f);
}

// The (row, group) of this warp: its first element and the group's size; false past the end.
struct Segment {
  int64_t id, off, col0;
  int lane, size;
  __device__ bool init(const GatedNormParams& p) {
    id = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (id >= p.rows * p.groups) return false;
    lane = threadIdx.x & 31, size = p.width / p.groups;
    col0 = (id % p.groups) * size, off = (id / p.groups) * p.width + col0;
    return true;
  }
};

template <typename T>
__global__ void gated_fwd_kernel(GatedNormParams p) {
  Segment sg;
  if (!sg.init(p)) return;
  const T* x = static_cast<const T*>(p.x) + sg.off;
  const T* z = p.z ? static_cast<const T*>(p.z) + sg.off : nullptr;
  if (p.residual) {  // x + residual, stored; the passes below read it back (this thread's writes)
    const T* res = static_cast<const T*>(p.residual) + sg.off;
    T* sum = static_cast<T*>(p.sum) + sg.off;
    for (int j = sg.lane; j < sg.size; j += 32)
      sum[j] = from_float<T>(to_float(x[j]) + to_float(res[j]));
    x = sum;
  }
  float ss = 0.f;
  for (int j = sg.lane; j < sg.size; j += 32) {
    const float g = gated(p, x, z, j);
    ss += g * g;
  }
  const float r = rsqrtf(warp_sum(ss) / float(sg.size) + p.eps);
  if (sg.lane == 0) p.rstd[sg.id] = r;
  T* y = static_cast<T*>(p.y) + sg.off;
  for (int j = sg.lane; j < sg.size; j += 32)
    y[j] = from_float<T>(gated(p, x, z, j) * r * p.w[sg.col0 + j]);
}

template <typename T>
__global__ void gated_bwd_kernel(GatedNormParams p) {
  Segment sg;
  if (!sg.init(p)) return;
  const T* x = static_cast<const T*>(p.x) + sg.off;
  const T* z = p.z ? static_cast<const T*>(p.z) + sg.off : nullptr;
  const T* dy = static_cast<const T*>(p.dy) + sg.off;
  const float r = p.rstd_in[sg.id];
  float dot = 0.f;
  for (int j = sg.lane; j < sg.size; j += 32)
    dot += to_float(dy[j]) * p.w[sg.col0 + j] * gated(p, x, z, j);
  const float c = warp_sum(dot) * r * r * r / float(sg.size);
  T* dx = static_cast<T*>(p.dx) + sg.off;
  T* dz = p.z ? static_cast<T*>(p.dz) + sg.off : nullptr;
  for (int j = sg.lane; j < sg.size; j += 32) {
    const float xv = to_float(x[j]), zv = z ? to_float(z[j]) : 0.f, zs = gate(p, zv);
    const float dg = r * p.w[sg.col0 + j] * to_float(dy[j]) - c * xv * zs;
    dx[j] = from_float<T>(p.accumulate_dx ? to_float(dx[j]) + dg * zs : dg * zs);
    if (z) {
      const float s = sigmoid(zv);
      dz[j] = from_float<T>(dg * xv * s * (1.f + zv * (1.f - s)));
    }
  }
}

template <typename T>
__global__ void gated_dw_partial_kernel(GatedNormParams p) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p.width) return;
  const int gs = p.width / p.groups, grp = col / gs;
  const int64_t r0 = int64_t(blockIdx.y) * kRowsPerBlock;
  const int64_t r1 = min(r0 + kRowsPerBlock, p.rows);
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.z);
  const T* dy = static_cast<const T*>(p.dy);
  float s = 0.f;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t i = row * p.width + col;
    s += to_float(dy[i]) * gated(p, x, z, i) * p.rstd_in[row * p.groups + grp];
  }
  p.partial[int64_t(blockIdx.y) * p.width + col] = s;
}

__global__ void gated_dw_sum_kernel(GatedNormParams p, int blocks) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p.width) return;
  float s = 0.f;
  for (int k = 0; k < blocks; ++k) s += p.partial[int64_t(k) * p.width + col];
  p.dw[col] += s;
}

unsigned warp_blocks(const GatedNormParams& p) {
  return unsigned((p.rows * p.groups + kWarps - 1) / kWarps);
}

}  // namespace

void gated_rmsnorm_fwd_cuda(const GatedNormParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.rows == 0) return;
  if (p.bf16)
    gated_fwd_kernel<__nv_bfloat16><<<warp_blocks(p), kWarps * 32, 0, stream>>>(p);
  else
    gated_fwd_kernel<float><<<warp_blocks(p), kWarps * 32, 0, stream>>>(p);
  CUDA_CHECK(cudaGetLastError());
}

void gated_rmsnorm_bwd_cuda(const GatedNormParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int blocks = int(gated_rmsnorm_row_blocks(p.rows));
  const unsigned cols = unsigned((p.width + 255) / 256);
  if (p.rows > 0) {
    if (p.bf16) {
      gated_bwd_kernel<__nv_bfloat16><<<warp_blocks(p), kWarps * 32, 0, stream>>>(p);
      gated_dw_partial_kernel<__nv_bfloat16><<<dim3(cols, unsigned(blocks)), 256, 0, stream>>>(p);
    } else {
      gated_bwd_kernel<float><<<warp_blocks(p), kWarps * 32, 0, stream>>>(p);
      gated_dw_partial_kernel<float><<<dim3(cols, unsigned(blocks)), 256, 0, stream>>>(p);
    }
    CUDA_CHECK(cudaGetLastError());
  }
  gated_dw_sum_kernel<<<cols, 256, 0, stream>>>(p, blocks);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
