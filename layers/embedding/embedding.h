// Embedding lookup: y[b,t,:] = W[tok[b,t], :].
//   tok [B,T] i32, W [V,D], y [B,T,D].
//   dW[v,:] += sum over (b,t) with tok[b,t] = v of dy[b,t,:]   (+=, in token order)
// Token ids outside [0, V) are errors naming the position.
#pragma once

#include "runtime/tensor.h"

namespace braid {

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y);
void embedding_backward(const Tensor& tokens, const Tensor& dy, const Tensor& dweight);

}  // namespace braid
