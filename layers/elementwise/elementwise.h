// Small elementwise ops used by blocks (contiguous tensors of one shape and dtype):
//   zero_fill:      y = 0
//   add_into:       y += x
//   neg_exp:        A = -exp(A_log)            (SSM decay rates from their stored log)
//   neg_exp_backward: dA_log += dA * A         (dA/dA_log = -exp(A_log) = A)
#pragma once

#include "runtime/tensor.h"

namespace braid {

void zero_fill(const Tensor& y);
void add_into(const Tensor& y, const Tensor& x);
void neg_exp(const Tensor& a_log, const Tensor& a);
void neg_exp_backward(const Tensor& a, const Tensor& da, const Tensor& da_log);

}  // namespace braid
