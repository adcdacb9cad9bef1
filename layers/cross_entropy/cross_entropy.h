// Cross-entropy over the vocabulary: loss_m = logsumexp_v(logits[m,:]) - logits[m, target_m].
//   logits [M,V], targets [M] i32 (-1 = ignored row), dlogits [M,V] (optional).
// Returns the sum of the losses and the number of rows counted. With dlogits, writes
//   dlogits[m,:] = grad_scale * (softmax(logits[m,:]) - onehot(target_m))   (=; 0 for ignored rows)
// so a caller averaging over all tokens of all microbatches passes grad_scale = 1 / count_total.
// Targets outside [-1, V) are errors naming the row.
#pragma once

#include <cstdint>

#include "parallel/communicator.h"
#include "runtime/tensor.h"

namespace braid {

struct LossSum {
  double sum = 0;
  int64_t count = 0;
};

LossSum cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor* dlogits,
                      double grad_scale);

// Vocabulary-parallel form (Megatron-LM's): this rank holds the logits of vocabulary entries
// [vocab_start, vocab_start + V_r) of vocab_size (logits, dlogits [M,V_r]); the row maxima, the
// sums of exponentials and the target logits are combined over `group` (three all-reduces of
// [M], in f64). Every rank returns the same LossSum and writes its columns of dlogits.
LossSum cross_entropy_vocab_parallel(const Tensor& logits, const Tensor& targets,
                                     const Tensor* dlogits, double grad_scale, int64_t vocab_start,
                                     int64_t vocab_size, Communicator& group);

}  // namespace braid
