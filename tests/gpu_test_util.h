// Helpers of the GPU kernel tests: host values, tensors made from them on either device, and the
// error measures of the "2x the naive error against f64" tolerance (DESIGN).
#pragma once

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "tests/test_util.h"

namespace braid {

// Host values of one tensor and its copies in each dtype.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<double> v;
  int64_t numel() const { return static_cast<int64_t>(v.size()); }
};

inline HostTensor random_tensor(std::vector<int64_t> shape, double lo, double hi, bool round_bf16,
                                std::mt19937_64& g) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  HostTensor h{std::move(shape), std::vector<double>(n)};
  std::uniform_real_distribution<double> u(lo, hi);
  for (double& x : h.v) {
    const float f = float(u(g));
    x = round_bf16 ? double(from_bf16(to_bf16(f))) : double(f);
  }
  return h;
}

// Fixture of the GPU kernel tests: skips without a GPU; makes host and device tensors from
// HostTensor values (memory kept until the test ends) and downloads results.
template <typename Case>
class GpuTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda_device_available()) GTEST_SKIP() << "no GPU visible: CUDA kernel tests skipped";
    gpu_ = make_cuda_backend(0);
  }
  // A tensor on `dev` with dtype `t` holding h's values (memory kept by this fixture).
  Tensor make(const HostTensor& h, DType t, Device dev, const std::string& name) {
    std::vector<char> bytes(h.numel() * dtype_size(t));
    for (int64_t i = 0; i < h.numel(); ++i) {
      switch (t) {
        case DType::f64:
          reinterpret_cast<double*>(bytes.data())[i] = h.v[i];
          break;
        case DType::f32:
          reinterpret_cast<float*>(bytes.data())[i] = float(h.v[i]);
          break;
        case DType::bf16:
          reinterpret_cast<bf16*>(bytes.data())[i] = to_bf16(float(h.v[i]));
          break;
        case DType::i32:
          reinterpret_cast<int32_t*>(bytes.data())[i] = int32_t(h.v[i]);
          break;
        default:
          break;
      }
    }
    if (dev == Device::cpu) {
      host_.push_back(std::move(bytes));
      return Tensor::contiguous_view(host_.back().data(), t, dev, h.shape, name);
    }
    void* d = gpu_->allocate(bytes.size());
    device_.push_back(d);
    gpu_->copy(d, Device::cuda, bytes.data(), Device::cpu, bytes.size(), {});
    gpu_->synchronize({});
    return Tensor::contiguous_view(d, t, dev, h.shape, name);
  }
  Tensor empty(std::vector<int64_t> shape, DType t, Device dev, const std::string& name) {
    HostTensor h{shape, std::vector<double>(1)};
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    h.v.assign(n, 0.0);
    return make(h, t, dev, name);
  }
  std::vector<char> download_bytes(const Tensor& t) {
    std::vector<char> bytes(t.nbytes());
    gpu_->copy(bytes.data(), Device::cpu, t.data, Device::cuda, bytes.size(), {});
    gpu_->synchronize({});
    return bytes;
  }
  std::vector<double> download(const Tensor& t) {
    const std::vector<char> bytes = download_bytes(t);
    std::vector<double> out(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i)
      out[i] = t.dtype == DType::bf16 ? from_bf16(reinterpret_cast<const bf16*>(bytes.data())[i])
                                      : reinterpret_cast<const float*>(bytes.data())[i];
    return out;
  }
  void TearDown() override {
    for (void* d : device_) gpu_->release(d);
  }

  std::unique_ptr<Backend> gpu_;
  std::vector<std::vector<char>> host_;
  std::vector<void*> device_;
};

inline std::vector<double> host_values(const Tensor& t, bool round_bf16) {
  std::vector<double> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
    out[i] = round_bf16 ? double(from_bf16(to_bf16(float(v)))) : v;
  }
  return out;
}

inline double max_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i)
    e = std::isfinite(a[i]) ? std::max(e, std::abs(a[i] - ref[i])) : 1e30;
  return e;
}
inline double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

}  // namespace braid
