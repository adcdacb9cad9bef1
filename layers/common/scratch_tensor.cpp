#include "layers/common/scratch_tensor.h"

#include "runtime/check.h"

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#endif

namespace braid {

ScratchTensor::ScratchTensor(DType dtype, std::vector<int64_t> shape, Device device, void* stream)
    : stream_(stream) {
  int64_t n = 1;
  for (int64_t x : shape) n *= x;
  void* p = nullptr;
  if (device == Device::cpu) {
    host_.assign(size_t(n) + 2, 0.0);
    p = host_.data();
  } else {
#if defined(BRAID_WITH_CUDA)
    const size_t bytes = size_t(n) * dtype_size(dtype) + 16;  // + 16: never empty
    const auto s = static_cast<cudaStream_t>(stream);
    CUDA_CHECK(cudaMallocAsync(&p, bytes, s));
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, s));
    dev_ = p;
#else
    BRAID_FAIL("scratch on the GPU, but this build has no CUDA (-DBRAID_CUDA=ON)");
#endif
  }
  t = Tensor::contiguous_view(p, dtype, device, shape, "scratch");
}

ScratchTensor::ScratchTensor(ScratchTensor&& o) noexcept
    : t(o.t), host_(std::move(o.host_)), dev_(o.dev_), stream_(o.stream_) {
  o.dev_ = nullptr;
}

ScratchTensor::~ScratchTensor() {
#if defined(BRAID_WITH_CUDA)
  if (dev_) cudaFreeAsync(dev_, static_cast<cudaStream_t>(stream_));
#endif
}

const Tensor* scratch_like(std::deque<ScratchTensor>& keep, const Tensor* t, void* stream) {
  if (!t) return nullptr;
  keep.emplace_back(t->dtype, std::vector<int64_t>(t->shape.begin(), t->shape.begin() + t->ndim),
                    t->device, stream);
  return &keep.back().t;
}

}  // namespace braid
