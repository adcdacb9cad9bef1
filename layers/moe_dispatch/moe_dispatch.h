// Token dispatch for MoE: permute routed tokens into one compact buffer of rows grouped by expert
// and combine the expert outputs back, weighted.
//   plan:    offsets[e] = sum_{j<e} min(counts_j, cap); the assignment (m, k) with slot s >= 0 to
//            expert e owns row offsets[e] + s; row_token[row] = m.        total rows <= M*K
//   gather:  xe[row] = x[row_token[row]]                         x [M,D], xe [M*K,D]
//            backward: dx[m] += sum over rows of m of dxe[row]    (+=, rows in order)
//   combine: y[m] = sum_k w[m,k] oe[row(m,k)] (dropped assignments add nothing)   (=)
//            backward: doe[row(m,k)] = w[m,k] dy[m] (=);  dw[m,k] = dy[m] . oe[row(m,k)] (=, 0 if
//            dropped)
//   expert, slot [M,K] i32 (from the router); offsets [E+1] i32; row_token [M*K] i32.
#pragma once

#include "runtime/tensor.h"

namespace braid {

// Returns the number of rows in use (offsets[E]).
int64_t moe_dispatch_plan(const Tensor& expert, const Tensor& slot, const Tensor& counts,
                          int64_t capacity, const Tensor& offsets, const Tensor& row_token);
void moe_gather(const Tensor& x, const Tensor& row_token, int64_t rows, const Tensor& xe);
void moe_gather_backward(const Tensor& dxe, const Tensor& row_token, int64_t rows,
                         const Tensor& dx);
void moe_combine(const Tensor& oe, const Tensor& expert, const Tensor& slot, const Tensor& offsets,
                 const Tensor& weight, const Tensor& y);
void moe_combine_backward(const Tensor& dy, const Tensor& oe, const Tensor& expert,
                          const Tensor& slot, const Tensor& offsets, const Tensor& weight,
                          const Tensor& doe, const Tensor& dweight);

}  // namespace braid
