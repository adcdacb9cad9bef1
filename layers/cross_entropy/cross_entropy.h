// Cross-entropy over the vocabulary: loss_m = logsumexp_v(logits[m,:]) - logits[m, target_m].
//   logits [M,V], targets [M] i32 (-1 = ignored row), dlogits [M,V] (optional).
// Returns the sum of the losses and the number of rows counted. With dlogits, writes
//   dlogits[m,:] = grad_scale * (softmax(logits[m,:]) - onehot(target_m))   (=; 0 for ignored rows)
// so a caller averaging over all tokens of all microbatches passes grad_scale = 1 / count_total.
// Targets outside [-1, V) are errors naming the row.
// GPU logits (bf16 or f32, dlogits the same dtype and possibly the same memory) go through
// cross_entropy_rows, which leaves each row's result on the device, and read_row_losses, which
// brings a microbatch's rows back at once (one synchronisation) and sums them in row order.
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

// GPU: per row m, row_loss[m] = {loss_m, 1} for a counted row, {0, 0} for an ignored one and
// {0, -1} for a target outside [-1, V); dlogits as above (f32 math). row_loss [M,2] f32.
void cross_entropy_rows(const Tensor& logits, const Tensor& targets, const Tensor* dlogits,
                        double grad_scale, const Tensor& row_loss, void* stream = nullptr);
// The sum of the counted rows of row_loss [M,2] (on the GPU) and their number; a row whose
// target was outside the vocabulary is an error naming it.
LossSum read_row_losses(const Tensor& row_loss, void* stream = nullptr);
void cross_entropy_rows_cuda(const void* logits, const int32_t* targets, void* dlogits,
                             float grad_scale, float* row_loss, int64_t m, int64_t v, bool bf16,
                             void* stream);
// Copies row_loss [m,2] to host (waiting for the stream).
void copy_row_losses_cuda(const float* row_loss, float* host, int64_t m, void* stream);

// Vocabulary-parallel form (Megatron-LM's): this rank holds the logits of vocabulary entries
// [vocab_start, vocab_start + V_r) of vocab_size (logits, dlogits [M,V_r]); the row maxima, the
// sums of exponentials and the target logits are combined over `group` (three all-reduces of
// [M], in f64). Every rank returns the same LossSum and writes its columns of dlogits.
LossSum cross_entropy_vocab_parallel(const Tensor& logits, const Tensor& targets,
                                     const Tensor* dlogits, double grad_scale, int64_t vocab_start,
                                     int64_t vocab_size, Communicator& group);
// The same on the GPU, per row as cross_entropy_rows (row_loss [M,2] on every rank): each rank's
// row maxima, sums of exponentials and target logits (stats, f32 [4,M] workspace) are combined
// over `group` (GPU tensors: NCCL) by an all-reduce of the maxima and one of the rescaled sums
// with the target logits; f32 math.
void cross_entropy_rows_vocab_parallel(const Tensor& logits, const Tensor& targets,
                                       const Tensor* dlogits, double grad_scale,
                                       const Tensor& row_loss, int64_t vocab_start,
                                       int64_t vocab_size, Communicator& group,
                                       const Tensor& stats);
void ce_vocab_parallel_stats_cuda(const void* logits, const int32_t* targets, int64_t m, int64_t v,
                                  int64_t v0, bool bf16, float* stats, void* stream);
void ce_vocab_parallel_rescale_cuda(float* stats, int64_t m, void* stream);
void ce_vocab_parallel_finish_cuda(const void* logits, const int32_t* targets, void* dlogits,
                                   float grad_scale, const float* stats, float* row_loss, int64_t m,
                                   int64_t v, int64_t v0, int64_t vocab, bool bf16, void* stream);

}  // namespace braid
