// Tensor: a non-owning, typed view of memory on one device. Dimensions are outermost first,
// strides are in elements; memory belongs to an Arena (or a test's buffer), never to the view.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "runtime/check.h"
#include "runtime/dtype.h"

namespace braid {

enum class Device : uint8_t { cpu, cuda };
std::string_view device_name(Device d);

constexpr int kMaxDims = 6;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};
  std::string name;

  // A contiguous (row-major) view of `data` with shape[0..ndim).
  static Tensor contiguous_view(void* data, DType dtype, Device device, const int64_t* shape,
                                int ndim, std::string name);
  static Tensor contiguous_view(void* data, DType dtype, Device device,
                                const std::vector<int64_t>& shape, std::string name) {
    return contiguous_view(data, dtype, device, shape.data(), static_cast<int>(shape.size()),
                           std::move(name));
  }
  static Tensor contiguous_view(void* data, DType dtype, Device device,
                                std::initializer_list<int64_t> shape, std::string name) {
    return contiguous_view(data, dtype, device, shape.begin(), static_cast<int>(shape.size()),
                           std::move(name));
  }

  bool defined() const { return data != nullptr || numel() == 0; }
  int64_t size(int d) const;  // d < 0 counts from the end
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;

  // The same memory as a contiguous tensor of another shape with the same element count.
  Tensor reshape(std::initializer_list<int64_t> new_shape) const;
  // Elements [start, start + len) along dimension d.
  Tensor slice(int d, int64_t start, int64_t len) const;
  Tensor renamed(std::string new_name) const;

  template <typename T>
  T* ptr() const {
    BRAID_CHECK(dtype == dtype_of<T>(), "tensor '", name, "' is ", dtype_name(dtype),
                ", accessed as ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }

  std::string describe() const;  // name[d0,d1,...]:dtype@device
};

// Throws unless t has exactly the given shape (checked dims named in the message).
void check_shape(const Tensor& t, std::initializer_list<int64_t> shape);
void check_same_dtype(const Tensor& a, const Tensor& b);

}  // namespace braid
