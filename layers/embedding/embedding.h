// Embedding lookup: y[b,t,:] = W[tok[b,t], :].
//   tok [B,T] i32, W [V,D], y [B,T,D].
//   dW[v,:] += sum over (b,t) with tok[b,t] = v of dy[b,t,:]   (+=, in token order)
// Token ids outside [0, V) are errors naming the position.
// Vocabulary-parallel form (vocab_size > 0): W holds rows [vocab_start, vocab_start + rows) of a
// vocabulary of vocab_size; tokens outside those rows give zero rows in y (the sum over the
// ranks is the lookup) and add nothing to dW.
#pragma once

#include "runtime/tensor.h"

namespace braid {

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y,
                       int64_t vocab_start = 0, int64_t vocab_size = 0);
void embedding_backward(const Tensor& tokens, const Tensor& dy, const Tensor& dweight,
                        int64_t vocab_start = 0, int64_t vocab_size = 0);

}  // namespace braid
