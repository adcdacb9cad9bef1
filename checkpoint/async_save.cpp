#include "checkpoint/async_save.h"

#include <chrono>
#include <cstring>
#include <utility>

namespace braid {

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  if (thread_.joinable()) thread_.join();
}

void AsyncCheckpointWriter::wait() {
  if (thread_.joinable()) thread_.join();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void AsyncCheckpointWriter::submit(const std::string& root, const CheckpointMeta& meta,
                                   const std::vector<CheckpointTensor>& tensors, Done done) {
  wait();
  size_t total = 0;
  for (const CheckpointTensor& t : tensors) {
    BRAID_CHECK(t.tensor.device == Device::cpu && t.tensor.is_contiguous(),
                "async checkpoint: ", t.tensor.describe(), " must be a contiguous host tensor");
    total += (t.tensor.nbytes() + 63) / 64 * 64;
  }
  staging_.resize(total);
  std::vector<CheckpointTensor> staged;
  std::vector<size_t> offsets;
  size_t at = 0;
  for (const CheckpointTensor& t : tensors) {
    offsets.push_back(at);
    staged.push_back(
        {t.kind, t.name,
         Tensor::contiguous_view(
             staging_.data() + at, t.tensor.dtype, Device::cpu,
             std::vector<int64_t>(t.tensor.shape.begin(), t.tensor.shape.begin() + t.tensor.ndim),
             t.tensor.name)});
    at += (t.tensor.nbytes() + 63) / 64 * 64;
  }
  // The copy is all the caller waits for: every core takes part.
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < tensors.size(); ++i)
    std::memcpy(staging_.data() + offsets[i], tensors[i].tensor.data, tensors[i].tensor.nbytes());
  thread_ = std::thread([this, root, meta, staged = std::move(staged), done = std::move(done)] {
    try {
      const auto t0 = std::chrono::steady_clock::now();
      const std::string dir = save_checkpoint(root, meta, staged);
      done(dir, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

}  // namespace braid
