// Data-parallel gradient sums in buckets, overlapped with the backward. The flat gradient vector
// [n] of a parameter region is cut into buckets of about `bucket_elems` elements. The backward runs
// from the last layer to the first, and parameters are laid out first layer first, so it finishes
// the gradients from the end of the vector downward: ready_from(x) (every gradient at flat offset
// x or above is final) starts the sum over the group of each bucket lying wholly at or above x,
// without waiting (NCCL: on the communicator's stream, beside the backward's kernels); finish()
// starts the rest and waits for all. The buckets are the same every step, so for a fixed group the
// sums are too (deterministic).
#pragma once

#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace braid {

class GradBuckets {
 public:
  GradBuckets(const Tensor& grads, Communicator& group, int64_t bucket_elems);
  void ready_from(int64_t offset);
  void finish();
  int buckets() const { return static_cast<int>(starts_.size()) - 1; }

 private:
  Tensor grads_;
  Communicator& group_;
  std::vector<int64_t> starts_;  // bucket i: [starts_[i], starts_[i + 1])
  int next_ = 0;                 // buckets next_ and above are started (counting down)
  std::vector<std::unique_ptr<PendingTransfer>> pending_;
};

}  // namespace braid
