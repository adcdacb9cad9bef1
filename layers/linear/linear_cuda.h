// The GPU linear through cuBLASLt (linear_cuda.cpp): the caller's GemmContext holds the library
// handle, a workspace (from the caller's memory plan) and the stream. bf16 or f32 operands,
// f32 accumulation; the bias added by the GEMM's epilogue; db = the column sums of dy, computed
// over row blocks into the context's workspace and added in a fixed order (deterministic).
#pragma once

#include <cstddef>

#include "runtime/backend.h"

namespace braid {

class GemmContext {
 public:
  // workspace_bytes of device memory from `backend` (a CUDA backend) for cuBLASLt and the bias
  // gradient's partial sums.
  GemmContext(Backend& backend, size_t workspace_bytes = size_t(32) << 20, void* stream = nullptr);
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  void* handle() const { return handle_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return bytes_; }
  void* stream() const { return stream_; }

 private:
  Backend& backend_;
  void* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t bytes_ = 0;
  void* stream_ = nullptr;
};

}  // namespace braid
