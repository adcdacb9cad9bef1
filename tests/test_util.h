// Test helpers: host buffers that back tensors, random fills, and a finite-difference gradient
// checker in f64.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "runtime/check.h"
#include "runtime/tensor.h"

namespace braid::test {

// Owns host memory for tensors made in a test.
class Buffers {
 public:
  Tensor make(DType dtype, std::initializer_list<int64_t> shape, const std::string& name) {
    Tensor t = Tensor::contiguous_view(nullptr, dtype, Device::cpu, shape, name);
    store_.emplace_back(t.nbytes() / 8 + 1, 0.0);
    t.data = store_.back().data();
    return t;
  }
  Tensor like(const Tensor& t, const std::string& name) {
    Tensor r = t;
    store_.emplace_back(t.nbytes() / 8 + 1, 0.0);
    r.data = store_.back().data();
    r.name = name;
    return r;
  }

 private:
  std::vector<std::vector<double>> store_;
};

// The message of the braid::Error that f throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A fresh directory named after the process and the running test, removed afterwards.
class TempDir {
 public:
  TempDir()
      : path_(std::filesystem::temp_directory_path() /
              ("braid_test_" + std::to_string(::getpid()) + "_" +
               ::testing::UnitTest::GetInstance()->current_test_info()->name())) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// A contiguous copy of positions [start, start+len) along dim 1 of a [B,T,...] tensor.
inline Tensor time_slice(Buffers& buf, const Tensor& full, int64_t start, int64_t len,
                         const std::string& name) {
  Tensor h = buf.like(full, name);
  h.shape[1] = len;
  h = Tensor::contiguous_view(h.data, h.dtype, h.device, h.shape.data(), h.ndim, name);
  const int64_t b = full.size(0), inner = full.numel() / (b * full.size(1));
  const size_t es = dtype_size(full.dtype);
  for (int64_t i = 0; i < b; ++i)
    std::memcpy(static_cast<char*>(h.data) + i * len * inner * es,
                static_cast<char*>(full.data) + (i * full.size(1) + start) * inner * es,
                len * inner * es);
  return h;
}

// Fresh random values from a generator seeded per test case.
inline std::mt19937_64& rng() {
  static thread_local std::mt19937_64 g;
  return g;
}
inline void reseed(uint64_t s) {
  rng().seed(s);
}

template <typename T>
void fill_uniform(const Tensor& t, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  T* p = t.ptr<T>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = T(u(rng()));
}
inline void fill_uniform(const Tensor& t, double lo, double hi) {
  if (t.dtype == DType::f64)
    fill_uniform<double>(t, lo, hi);
  else
    fill_uniform<float>(t, lo, hi);
}
// Fills with NaN so an element an op should have written but did not is caught.
inline void poison(const Tensor& t) {
  if (t.dtype == DType::f64)
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<double>()[i] = std::nan("");
  else if (t.dtype == DType::f32)
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = std::nanf("");
}
inline void zero(const Tensor& t) {
  std::memset(t.data, 0, t.nbytes());
}
inline double at(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
}
inline void set(const Tensor& t, int64_t i, double v) {
  if (t.dtype == DType::f64)
    t.ptr<double>()[i] = v;
  else
    t.ptr<float>()[i] = float(v);
}

// Largest |a - b| / (atol + rtol |b|) over all elements; <= 1 passes.
inline double max_violation(const Tensor& a, const Tensor& b, double atol, double rtol) {
  EXPECT_EQ(a.numel(), b.numel());
  double worst = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = at(a, i), y = at(b, i);
    const double v =
        std::isfinite(x) && std::isfinite(y) ? std::abs(x - y) / (atol + rtol * std::abs(y)) : 1e30;
    worst = std::max(worst, v);
  }
  return worst;
}

// Central finite differences of the scalar loss L = sum(out * probe) with respect to `input`,
// compared with the analytic gradient `grad`. `run` recomputes `out` from the current inputs.
// In f64 with step h, the truncation error is O(h^2 |f'''|) and rounding O(eps |L| / h); h = 1e-6
// balances them at about 1e-10 relative, so a 1e-6 tolerance flags any real error.
inline void expect_gradient(const std::string& what, const Tensor& input, const Tensor& grad,
                            const std::function<double()>& loss, double tol = 1e-6,
                            int64_t max_checks = 64) {
  ASSERT_EQ(input.dtype, DType::f64) << what;
  const int64_t n = input.numel();
  const int64_t stride = std::max<int64_t>(1, n / max_checks);
  const double h = 1e-6;
  double* p = input.ptr<double>();
  for (int64_t i = (n > 1 ? int64_t(rng()() % stride) : 0); i < n; i += stride) {
    const double keep = p[i];
    p[i] = keep + h;
    const double lp = loss();
    p[i] = keep - h;
    const double lm = loss();
    p[i] = keep;
    const double fd = (lp - lm) / (2 * h);
    const double an = at(grad, i);
    EXPECT_NEAR(an, fd, tol * (1 + std::abs(fd)))
        << what << " element " << i << " of " << input.describe();
  }
}

// L = sum(out * probe) with probe fixed random weights.
inline double weighted_sum(const Tensor& out, const Tensor& probe) {
  double s = 0;
  for (int64_t i = 0; i < out.numel(); ++i) s += at(out, i) * at(probe, i);
  return s;
}

}  // namespace braid::test
