// Gated RMSNorm on the GPU (math in gated_rmsnorm.h); without a gate (z null) it is the plain
// RMSNorm of layers/rmsnorm/ (one group). Forward and backward give one warp to each
// (row, group): a first pass over the group's elements sums g^2 (forward) or (w dy) . g
// (backward) in f32, a warp reduction finishes it, and a second pass (from L1/L2) writes y or
// dx and dz. dw = sum over rows of dy g r is column-parallel: a thread owns a column of a
// 256-row block and writes its partial sum; a second kernel adds the blocks in order
// (deterministic, no atomics). Memory-bound: the forward reads x and z and writes y (6 bytes per
// bf16 element); the backward reads x, z, dy twice (the dw pass) and writes dx and dz.
// Groups of 256, 512, 1024 or 2048 elements with 16-byte aligned rows take the vector kernels:
// each lane moves 8 consecutive elements per access (16 bytes of bf16), the forward keeps its
// gated values in registers (one read of x, z and the residual), the backward reads its row twice
// in 8-element vectors. Scalar accesses of 2 bytes ran the plain RMSNorm of a [16384, 2048] bf16
// tensor at a quarter of the H100's memory bandwidth (207 us forward with the residual add).
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

// kV vectors of 8 per lane: the group's element (c 32 + lane) 8 + i is vector c's element i.
template <typename T, int kV>
__global__ void gated_fwd_vec_kernel(GatedNormParams p) {
  Segment sg;
  if (!sg.init(p)) return;
  float g[kV][8];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < kV; ++c) {
    const int64_t e = sg.off + (c * 32 + sg.lane) * 8;
    load8(static_cast<const T*>(p.x) + e, g[c]);
    if (p.residual) {  // x + residual, stored rounded; normalised as stored
      float r[8];
      load8(static_cast<const T*>(p.residual) + e, r);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[c][i] = to_float(from_float<T>(g[c][i] + r[i]));
      store8(static_cast<T*>(p.sum) + e, g[c]);
    }
    if (p.z) {
      float zv[8];
      load8(static_cast<const T*>(p.z) + e, zv);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[c][i] *= zv[i] * sigmoid(zv[i]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += g[c][i] * g[c][i];
  }
  const float r = rsqrtf(warp_sum(ss) / float(sg.size) + p.eps);
  if (sg.lane == 0) p.rstd[sg.id] = r;
#pragma unroll
  for (int c = 0; c < kV; ++c) {
    const int col = (c * 32 + sg.lane) * 8;
    float w[8];
    load8(p.w + sg.col0 + col, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) g[c][i] *= r * w[i];
    store8(static_cast<T*>(p.y) + sg.off + col, g[c]);
  }
}

template <typename T, int kV>
__global__ void gated_bwd_vec_kernel(GatedNormParams p) {
  Segment sg;
  if (!sg.init(p)) return;
  const float r = p.rstd_in[sg.id];
  auto at = [&](const void* base, int c) {
    return static_cast<const T*>(base) + sg.off + (c * 32 + sg.lane) * 8;
  };
  float dot = 0.f;
#pragma unroll
  for (int c = 0; c < kV; ++c) {
    float xv[8], dy[8], w[8], zv[8];
    load8(at(p.x, c), xv);
    load8(at(p.dy, c), dy);
    load8(p.w + sg.col0 + (c * 32 + sg.lane) * 8, w);
    if (p.z) load8(at(p.z, c), zv);
#pragma unroll
    for (int i = 0; i < 8; ++i) dot += dy[i] * w[i] * xv[i] * (p.z ? zv[i] * sigmoid(zv[i]) : 1.f);
  }
  const float k = warp_sum(dot) * r * r * r / float(sg.size);
#pragma unroll
  for (int c = 0; c < kV; ++c) {
    const int64_t e = sg.off + (c * 32 + sg.lane) * 8;
    float xv[8], dy[8], w[8], zv[8], dx[8], dz[8];
    load8(at(p.x, c), xv);
    load8(at(p.dy, c), dy);
    load8(p.w + sg.col0 + (c * 32 + sg.lane) * 8, w);
    if (p.z) load8(at(p.z, c), zv);
    if (p.accumulate_dx) load8(static_cast<const T*>(p.dx) + e, dx);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s = p.z ? sigmoid(zv[i]) : 1.f, zs = p.z ? zv[i] * s : 1.f;
      const float dg = r * w[i] * dy[i] - k * xv[i] * zs;
      dx[i] = p.accumulate_dx ? dx[i] + dg * zs : dg * zs;
      if (p.z) dz[i] = dg * xv[i] * s * (1.f + zv[i] * (1.f - s));
    }
    store8(static_cast<T*>(p.dx) + e, dx);
    if (p.z) store8(static_cast<T*>(p.dz) + e, dz);
  }
}

unsigned warp_blocks(const GatedNormParams& p) {
  return unsigned((p.rows * p.groups + kWarps - 1) / kWarps);
}

}  // namespace

// The vector kernels' kV (vectors of 8 per lane) for this call, or 0 for the scalar kernels: a
// group of 256 kV elements (kV = 1, 2, 4, 8) and every row 16-byte aligned.
int vectors(const GatedNormParams& p) {
  const int size = p.width / p.groups, v = size / 256;
  if (size % 256 != 0 || (v != 1 && v != 2 && v != 4 && v != 8)) return 0;
  const void* ptrs[] = {p.x, p.z, p.dy, p.residual, p.sum, p.y, p.dx, p.dz, p.w};
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return 0;
  return v;
}

template <typename T>
void launch_fwd(const GatedNormParams& p, cudaStream_t stream) {
  const unsigned blocks = warp_blocks(p), threads = kWarps * 32;
  switch (vectors(p)) {
    case 1:
      return gated_fwd_vec_kernel<T, 1><<<blocks, threads, 0, stream>>>(p);
    case 2:
      return gated_fwd_vec_kernel<T, 2><<<blocks, threads, 0, stream>>>(p);
    case 4:
      return gated_fwd_vec_kernel<T, 4><<<blocks, threads, 0, stream>>>(p);
    case 8:
      return gated_fwd_vec_kernel<T, 8><<<blocks, threads, 0, stream>>>(p);
    default:
      return gated_fwd_kernel<T><<<blocks, threads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_bwd(const GatedNormParams& p, cudaStream_t stream) {
  const unsigned blocks = warp_blocks(p), threads = kWarps * 32;
  switch (vectors(p)) {
    case 1:
      return gated_bwd_vec_kernel<T, 1><<<blocks, threads, 0, stream>>>(p);
    case 2:
      return gated_bwd_vec_kernel<T, 2><<<blocks, threads, 0, stream>>>(p);
    case 4:
      return gated_bwd_vec_kernel<T, 4><<<blocks, threads, 0, stream>>>(p);
    case 8:
      return gated_bwd_vec_kernel<T, 8><<<blocks, threads, 0, stream>>>(p);
    default:
      return gated_bwd_kernel<T><<<blocks, threads, 0, stream>>>(p);
  }
}

void gated_rmsnorm_fwd_cuda(const GatedNormParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.rows == 0) return;
  if (p.bf16)
    launch_fwd<__nv_bfloat16>(p, stream);
  else
    launch_fwd<float>(p, stream);
  CUDA_CHECK(cudaGetLastError());
}

void gated_rmsnorm_bwd_cuda(const GatedNormParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int blocks = int(gated_rmsnorm_row_blocks(p.rows));
  const unsigned cols = unsigned((p.width + 255) / 256);
  if (p.rows > 0) {
    if (p.bf16) {
      launch_bwd<__nv_bfloat16>(p, stream);
      gated_dw_partial_kernel<__nv_bfloat16><<<dim3(cols, unsigned(blocks)), 256, 0, stream>>>(p);
    } else {
      launch_bwd<float>(p, stream);
      gated_dw_partial_kernel<float><<<dim3(cols, unsigned(blocks)), 256, 0, stream>>>(p);
    }
    CUDA_CHECK(cudaGetLastError());
  }
  gated_dw_sum_kernel<<<cols, 256, 0, stream>>>(p, blocks);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace braid
