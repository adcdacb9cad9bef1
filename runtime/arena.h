// Memory is planned, not discovered. An Arena hands out tensors from one allocation by bumping an
// offset (256-byte aligned). Planning runs the same set-up code against a *measuring* arena, which
// has no memory and only records the high-water mark; the real arena is then allocated once with
// that size. A training step takes nothing from the backend: blocks hold views into arenas made
// at set-up, and scratch regions are reused through mark()/reset().
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "runtime/backend.h"

namespace braid {

class Arena {
 public:
  static constexpr size_t kAlign = 256;

  // A measuring arena: take() returns tensors with null data and only advances the offset.
  static Arena measuring(std::string name, Device device);
  // A real arena of `bytes` bytes, allocated once from `backend` and released on destruction.
  static Arena allocate(std::string name, Backend& backend, size_t bytes);
  // An arena over `bytes` bytes at `base` that another owns (not released here): a part of a
  // real arena's allocation, planned again (a pipeline stage's activation slots).
  static Arena view(std::string name, Device device, void* base, size_t bytes);

  Arena() = default;
  Arena(Arena&& other) noexcept;
  Arena& operator=(Arena&& other) noexcept;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();

  Tensor take(std::string tensor_name, DType dtype, const int64_t* shape, int ndim);
  Tensor take(std::string tensor_name, DType dtype, const std::vector<int64_t>& shape) {
    return take(std::move(tensor_name), dtype, shape.data(), static_cast<int>(shape.size()));
  }
  Tensor take(std::string tensor_name, DType dtype, std::initializer_list<int64_t> shape) {
    return take(std::move(tensor_name), dtype, shape.begin(), static_cast<int>(shape.size()));
  }

  // The whole allocation as bytes (for zeroing it once after set-up).
  Tensor bytes() const;

  size_t mark() const { return offset_; }
  void reset(size_t mark);

  bool is_measuring() const { return measuring_; }
  Device device() const { return device_; }
  size_t used() const { return offset_; }
  size_t high_water() const { return high_water_; }
  size_t capacity() const { return capacity_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  Device device_ = Device::cpu;
  Backend* backend_ = nullptr;
  char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t offset_ = 0;
  size_t high_water_ = 0;
  bool measuring_ = true;
};

}  // namespace braid
