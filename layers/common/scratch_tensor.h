#pragma once

#include <deque>
#include <vector>

#include "runtime/tensor.h"

namespace braid {

// Zeroed storage of one tensor (any dtype) on a device: host memory, or on the GPU a buffer of
// CUDA's stream-ordered pool on `stream`, freed there when it goes out of scope (after the work
// queued on `stream` that uses it). Scratch outside the caller's memory plan: context
// parallelism's whole-sequence buffers, and ops' scratch where the caller plans none.
class ScratchTensor {
 public:
  Tensor t;
  ScratchTensor(DType dtype, std::vector<int64_t> shape, Device device, void* stream);
  ScratchTensor(ScratchTensor&& o) noexcept;
  ScratchTensor(const ScratchTensor&) = delete;
  ScratchTensor& operator=(const ScratchTensor&) = delete;
  ScratchTensor& operator=(ScratchTensor&&) = delete;
  ~ScratchTensor();

 private:
  std::vector<double> host_;  // 8 bytes an element: room for any dtype
  void* dev_ = nullptr;
  void* stream_ = nullptr;
};
// A ScratchTensor shaped like t on t's device, kept in `keep` (null for null).
const Tensor* scratch_like(std::deque<ScratchTensor>& keep, const Tensor* t, void* stream);

}  // namespace braid
