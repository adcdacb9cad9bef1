// The CUDA backend on a GPU (skipped where none is visible): fills, copies, streams and events,
// and Philox random fills that equal the CPU's bit for bit for the same (seed, id, index).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "runtime/backend.h"

namespace braid {
namespace {

class CudaBackend : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << "no GPU visible: CUDA backend tests skipped";
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  std::unique_ptr<Backend> gpu_, cpu_;
};

TEST_F(CudaBackend, FillAndCopyEveryDtype) {
  for (DType t :
       {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8}) {
    const int64_t n = 100003;
    void* d = gpu_->allocate(n * dtype_size(t));
    Tensor dt = Tensor::contiguous_view(d, t, Device::cuda, {n}, "d");
    gpu_->fill(dt, 3.0, {});
    std::vector<char> host(n * dtype_size(t)), want(n * dtype_size(t));
    gpu_->copy(host.data(), Device::cpu, d, Device::cuda, host.size(), {});
    gpu_->synchronize({});
    cpu_->fill(Tensor::contiguous_view(want.data(), t, Device::cpu, {n}, "w"), 3.0, {});
    EXPECT_EQ(std::memcmp(host.data(), want.data(), host.size()), 0) << dtype_name(t);
    gpu_->release(d);
  }
}

TEST_F(CudaBackend, RandomFillsEqualCpuBitForBit) {
  const int64_t n = 1 << 20;
  for (RandomSpec::Kind k : {RandomSpec::Kind::uniform, RandomSpec::Kind::normal}) {
    for (DType t : {DType::f32, DType::bf16}) {
      const RandomSpec spec{k, 0x1234abcdull, 77u, k == RandomSpec::Kind::uniform ? -0.5f : 0.0f,
                            0.02f};
      void* d = gpu_->allocate(n * dtype_size(t));
      gpu_->fill_random(Tensor::contiguous_view(d, t, Device::cuda, {n}, "g"), spec, {});
      std::vector<char> host(n * dtype_size(t)), want(n * dtype_size(t));
      gpu_->copy(host.data(), Device::cpu, d, Device::cuda, host.size(), {});
      gpu_->synchronize({});
      cpu_->fill_random(Tensor::contiguous_view(want.data(), t, Device::cpu, {n}, "c"), spec, {});
      int64_t differ = 0;
      const size_t es = dtype_size(t);
      for (int64_t i = 0; i < n; ++i)
        differ += std::memcmp(host.data() + i * es, want.data() + i * es, es) != 0;
      EXPECT_EQ(differ, 0) << (k == RandomSpec::Kind::uniform ? "uniform " : "normal ")
                           << dtype_name(t);
      gpu_->release(d);
    }
  }
}

TEST_F(CudaBackend, StreamsAndEventsOrderWork) {
  const int64_t n = 1 << 22;
  Stream a = gpu_->create_stream(), b = gpu_->create_stream();
  Event e = gpu_->create_event();
  void* x = gpu_->allocate(n * 4);
  void* y = gpu_->allocate(n * 4);
  const Tensor tx = Tensor::contiguous_view(x, DType::f32, Device::cuda, {n}, "x");
  gpu_->fill(tx, 7.0, a);
  gpu_->record(e, a);
  gpu_->wait(b, e);
  gpu_->copy(y, Device::cuda, x, Device::cuda, n * 4, b);
  std::vector<float> host(n);
  gpu_->copy(host.data(), Device::cpu, y, Device::cuda, n * 4, b);
  gpu_->synchronize(b);
  EXPECT_EQ(host[0], 7.0f);
  EXPECT_EQ(host[n - 1], 7.0f);
  gpu_->release(x);
  gpu_->release(y);
  gpu_->destroy_event(e);
  gpu_->destroy_stream(a);
  gpu_->destroy_stream(b);
}

}  // namespace
}  // namespace braid
