#include "parallel/grad_buckets.h"

#include "runtime/check.h"

namespace braid {

GradBuckets::GradBuckets(const Tensor& grads, Communicator& group, int64_t bucket_elems)
    : grads_(grads), group_(group) {
  BRAID_CHECK(grads.ndim == 1 && grads.is_contiguous(), "GradBuckets: ", grads.describe(),
              " must be a flat gradient vector");
  BRAID_CHECK(bucket_elems > 0, "GradBuckets: bucket size must be positive");
  const int64_t n = grads.numel(), nb = std::max<int64_t>(1, (n + bucket_elems - 1) / bucket_elems);
  for (int64_t i = 0; i <= nb; ++i) starts_.push_back(n * i / nb);  // equal to within one element
  next_ = buckets();
}

void GradBuckets::ready_from(int64_t offset) {
  while (next_ > 0 && starts_[next_ - 1] >= offset) {
    --next_;
    pending_.push_back(group_.iall_reduce(
        grads_.slice(0, starts_[next_], starts_[next_ + 1] - starts_[next_]), ReduceOp::sum));
  }
}

void GradBuckets::finish() {
  ready_from(0);
  for (auto& p : pending_) p->wait();
  pending_.clear();
  next_ = buckets();
}

}  // namespace braid
