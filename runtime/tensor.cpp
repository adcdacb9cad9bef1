#include "runtime/tensor.h"

#include <sstream>

namespace braid {

std::string_view device_name(Device d) {
  return d == Device::cpu ? "cpu" : "cuda";
}

Tensor Tensor::contiguous_view(void* data, DType dtype, Device device, const int64_t* shape,
                               int ndim, std::string name) {
  BRAID_CHECK(ndim >= 0 && ndim <= kMaxDims, "tensor '", name, "' has ", ndim, " dims, at most ",
              kMaxDims, " supported");
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = ndim;
  t.name = std::move(name);
  int64_t s = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    BRAID_CHECK(shape[d] >= 0, "tensor '", t.name, "' has negative size ", shape[d], " in dim ", d);
    t.shape[d] = shape[d];
    t.stride[d] = s;
    s *= shape[d];
  }
  return t;
}

int64_t Tensor::size(int d) const {
  if (d < 0) d += ndim;
  BRAID_CHECK(d >= 0 && d < ndim, "tensor '", name, "' has no dim ", d);
  return shape[d];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != s) return false;
    s *= shape[d];
  }
  return true;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> new_shape) const {
  BRAID_CHECK(is_contiguous(), "reshape of non-contiguous tensor ", describe());
  Tensor t = contiguous_view(data, dtype, device, new_shape, name);
  BRAID_CHECK(t.numel() == numel(), "reshape of ", describe(), " to ", t.describe(),
              " changes the element count");
  return t;
}

Tensor Tensor::slice(int d, int64_t start, int64_t len) const {
  if (d < 0) d += ndim;
  BRAID_CHECK(d >= 0 && d < ndim && start >= 0 && len >= 0 && start + len <= shape[d], "slice [",
              start, ", ", start + len, ") of dim ", d, " out of range for ", describe());
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(start * stride[d]) * dtype_size(dtype);
  t.shape[d] = len;
  return t;
}

Tensor Tensor::renamed(std::string new_name) const {
  Tensor t = *this;
  t.name = std::move(new_name);
  return t;
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << (name.empty() ? "<unnamed>" : name) << "[";
  for (int d = 0; d < ndim; ++d) os << (d ? "," : "") << shape[d];
  os << "]:" << dtype_name(dtype) << "@" << device_name(device);
  return os.str();
}

void check_shape(const Tensor& t, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim == static_cast<int>(shape.size());
  int d = 0;
  for (int64_t s : shape) ok = ok && t.shape[d++] == s;
  if (ok) return;
  std::ostringstream want;
  d = 0;
  for (int64_t s : shape) want << (d++ ? "," : "") << s;
  BRAID_FAIL("tensor ", t.describe(), " should have shape [", want.str(), "]");
}

void check_same_dtype(const Tensor& a, const Tensor& b) {
  BRAID_CHECK(a.dtype == b.dtype, "dtype mismatch: ", a.describe(), " vs ", b.describe());
}

}  // namespace braid
