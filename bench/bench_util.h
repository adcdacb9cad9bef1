// Helpers of the GPU kernel benchmarks: random device tensors owned by a scope, the median time
// of a launch sequence (CUDA events, 3 warm-ups, 20 timed runs), and the --out JSON file.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda_check.h"

namespace braid::bench {

// GPU tensors filled with Philox values, released when the owner goes out of scope.
class DeviceTensors {
 public:
  explicit DeviceTensors(Backend& gpu) : gpu_(gpu) {}
  DeviceTensors(const DeviceTensors&) = delete;
  DeviceTensors& operator=(const DeviceTensors&) = delete;
  ~DeviceTensors() {
    for (void* d : mem_) gpu_.release(d);
  }
  Tensor random(std::vector<int64_t> shape, DType t, const char* name, RandomSpec spec) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    void* d = gpu_.allocate(n * dtype_size(t));
    mem_.push_back(d);
    Tensor tt = Tensor::contiguous_view(d, t, Device::cuda, shape, name);
    gpu_.fill_random(tt, spec, {});
    return tt;
  }

 private:
  Backend& gpu_;
  std::vector<void*> mem_;
};

// The value of `--out PATH` among the arguments ("" without one).
inline std::string out_path(int argc, char** argv) {
  std::string out;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  return out;
}

// Writes `text` and a newline to `path` (nothing for an empty path); false if it cannot.
inline bool write_text(const std::string& path, const std::string& text) {
  if (path.empty()) return true;
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return false;
  std::fprintf(f, "%s\n", text.c_str());
  return std::fclose(f) == 0;
}

inline double median_ms(const std::function<void()>& f) {
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CUDA_CHECK(cudaEventRecord(e0));
    f();
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float m = 0;
    CUDA_CHECK(cudaEventElapsedTime(&m, e0, e1));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  return ms[ms.size() / 2];
}

}  // namespace braid::bench
