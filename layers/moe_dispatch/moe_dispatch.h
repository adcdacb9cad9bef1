// Token dispatch for MoE: permute routed tokens into one compact buffer of rows grouped by expert
// and combine the expert outputs back, weighted.
//   plan:    offsets[e] = sum_{j<e} min(counts_j, cap); the assignment (m, k) with slot s >= 0 to
//            expert e owns row offsets[e] + s; row_token[row] = m.        total rows <= M*K
//   gather:  xe[row] = x[row_token[row]]                         x [M,D], xe [M*K,D]
//            backward: dx[m] += sum_k dxe[row(m,k)]   (+=, k in order; dropped add nothing)
//   combine: y[m] = sum_k w[m,k] oe[row(m,k)] (dropped assignments add nothing)   (=)
//            backward: doe[row(m,k)] = w[m,k] dy[m] (=);  dw[m,k] = dy[m] . oe[row(m,k)] (=, 0 if
//            dropped)
//   expert, slot [M,K] i32 (from the router); offsets [E+1] i32; row_token [M*K] i32.
// On the GPU (every tensor on the device; x, xe, oe, y, dy, doe, dx bf16 or f32, one dtype; weight
// and dweight f32) the plan runs on the device and reads offsets back into host_offsets (E+1 i32,
// one small copy and a wait: the expert GEMMs are sized on the host); every kernel is deterministic
// (each output element is written by one thread, sums in a fixed order).
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace braid {

// Returns the number of rows in use (offsets[E]); host_offsets (if given) receives offsets.
int64_t moe_dispatch_plan(const Tensor& expert, const Tensor& slot, const Tensor& counts,
                          int64_t capacity, const Tensor& offsets, const Tensor& row_token,
                          std::vector<int32_t>* host_offsets = nullptr);
void moe_gather(const Tensor& x, const Tensor& row_token, int64_t rows, const Tensor& xe);
void moe_gather_backward(const Tensor& dxe, const Tensor& expert, const Tensor& slot,
                         const Tensor& offsets, const Tensor& dx);
void moe_combine(const Tensor& oe, const Tensor& expert, const Tensor& slot, const Tensor& offsets,
                 const Tensor& weight, const Tensor& y);
void moe_combine_backward(const Tensor& dy, const Tensor& oe, const Tensor& expert,
                          const Tensor& slot, const Tensor& offsets, const Tensor& weight,
                          const Tensor& doe, const Tensor& dweight);
// The expert-parallel exchange of row counts moves them in a tensor of the device in use (over
// NCCL on GPUs): host values into a contiguous i64 tensor, and back (a GPU copy is waited for).
void moe_counts_store(const std::vector<int64_t>& host, const Tensor& t);
std::vector<int64_t> moe_counts_load(const Tensor& t);

// The CUDA side (moe_dispatch_kernels.cu), after the checks. token_sum: out[m] (+)= sum_k
// w[m,k] rows[row(m,k)] (w null: 1), the combine and the gather's backward.
void moe_dispatch_plan_cuda(const int32_t* expert, const int32_t* slot, const int32_t* counts,
                            int64_t m, int k, int e, int64_t cap, int32_t* offsets,
                            int32_t* row_token, void* stream);
void moe_gather_cuda(const void* x, const int32_t* row_token, int64_t rows, int64_t d, bool bf16,
                     void* xe, void* stream);
void moe_token_sum_cuda(const void* rows, const int32_t* expert, const int32_t* slot,
                        const int32_t* offsets, const float* weight, int64_t m, int k, int64_t d,
                        bool accumulate, bool bf16, void* out, void* stream);
void moe_combine_backward_cuda(const void* dy, const void* oe, const int32_t* expert,
                               const int32_t* slot, const int32_t* offsets, const float* weight,
                               int64_t m, int k, int64_t d, bool bf16, void* doe, float* dweight,
                               void* stream);

}  // namespace braid
