#include "runtime/arena.h"

#include <utility>

namespace braid {

Arena Arena::measuring(std::string name, Device device) {
  Arena a;
  a.name_ = std::move(name);
  a.device_ = device;
  a.measuring_ = true;
  return a;
}

Arena Arena::allocate(std::string name, Backend& backend, size_t bytes) {
  Arena a;
  a.name_ = std::move(name);
  a.device_ = backend.device();
  a.backend_ = &backend;
  a.capacity_ = bytes;
  a.measuring_ = false;
  try {
    a.base_ = static_cast<char*>(backend.allocate(bytes));
  } catch (const OutOfMemory& e) {
    throw OutOfMemory("memory for '" + a.name_ + "' (" + std::to_string(bytes >> 20) + " MiB on " +
                      std::string(device_name(a.device_)) + "): " + e.what());
  }
  return a;
}

Arena Arena::view(std::string name, Device device, void* base, size_t bytes) {
  Arena a;
  a.name_ = std::move(name);
  a.device_ = device;
  a.base_ = static_cast<char*>(base);
  a.capacity_ = bytes;
  a.measuring_ = false;
  return a;
}

Arena::Arena(Arena&& o) noexcept {
  *this = std::move(o);
}

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    if (backend_ && base_) backend_->release(base_);
    name_ = std::move(o.name_);
    device_ = o.device_;
    backend_ = std::exchange(o.backend_, nullptr);
    base_ = std::exchange(o.base_, nullptr);
    capacity_ = o.capacity_;
    offset_ = o.offset_;
    high_water_ = o.high_water_;
    measuring_ = o.measuring_;
  }
  return *this;
}

Arena::~Arena() {
  if (backend_ && base_) backend_->release(base_);
}

Tensor Arena::take(std::string tensor_name, DType dtype, const int64_t* shape, int ndim) {
  Tensor t = Tensor::contiguous_view(nullptr, dtype, device_, shape, ndim, std::move(tensor_name));
  const size_t bytes = (t.nbytes() + kAlign - 1) / kAlign * kAlign;
  if (!measuring_) {
    BRAID_CHECK(offset_ + bytes <= capacity_, "arena '", name_, "' exhausted: ", t.describe(),
                " needs ", bytes, " bytes at offset ", offset_, " of ", capacity_,
                " (the memory plan and the use disagree)");
    t.data = base_ + offset_;
  }
  offset_ += bytes;
  if (offset_ > high_water_) high_water_ = offset_;
  return t;
}

Tensor Arena::bytes() const {
  BRAID_CHECK(!measuring_, "arena '", name_, "' is a measuring arena and has no memory");
  return Tensor::contiguous_view(base_, DType::u8, device_, {static_cast<int64_t>(capacity_)},
                                 name_);
}

void Arena::reset(size_t mark) {
  BRAID_CHECK(mark <= offset_, "arena '", name_, "' reset to ", mark, " beyond offset ", offset_);
  offset_ = mark;
}

}  // namespace braid
