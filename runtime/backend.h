// Devices behind one interface: memory, copies, fills, streams and events. The CPU backend is
// synchronous (streams and events are no-ops); the CUDA backend wraps the runtime API, with every
// call checked where it is made. Backends count their allocations so tests can assert that a
// training step allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>

#include "runtime/philox.h"
#include "runtime/tensor.h"

namespace braid {

struct Stream {
  void* handle = nullptr;  // cudaStream_t on CUDA; null is the default stream / CPU
};
struct Event {
  void* handle = nullptr;
};

// Value of element i of a randomly initialised tensor: a function of (seed, tensor_id, i) only.
struct RandomSpec {
  enum class Kind : uint8_t { uniform, normal } kind = Kind::normal;
  uint64_t seed = 0;
  uint32_t tensor_id = 0;
  float a = 0.0f;  // uniform: low;  normal: mean
  float b = 1.0f;  // uniform: high; normal: standard deviation
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;

  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  // Host memory that this backend's copies read and write at full speed, asynchronously (CUDA:
  // page-locked; CPU: plain). Not counted in bytes_in_use.
  virtual void* allocate_host(size_t bytes) = 0;
  virtual void release_host(void* p) = 0;
  // Copies bytes between any two devices (one side must be this backend's or the host).
  virtual void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes,
                    Stream s) = 0;
  virtual void fill(const Tensor& t, double value, Stream s) = 0;  // t contiguous, float or int
  virtual void fill_random(const Tensor& t, const RandomSpec& spec, Stream s) = 0;  // float t

  virtual Stream create_stream() = 0;
  virtual void destroy_stream(Stream s) = 0;
  // Events mark a point of a stream's work (CPU: the moment of record). Timing events can be
  // measured against each other.
  virtual Event create_event(bool timing = false) = 0;
  virtual void destroy_event(Event e) = 0;
  virtual void record(Event e, Stream s) = 0;
  virtual void wait(Stream s, Event e) = 0;
  virtual void synchronize(Stream s) = 0;
  // Whether the work before the event's record has finished (does not wait).
  virtual bool finished(Event e) = 0;
  // Milliseconds from timing event `start` to timing event `end`, both recorded (waits for end).
  virtual double elapsed_ms(Event start, Event end) = 0;

  int64_t allocation_count() const { return allocations_; }
  size_t bytes_in_use() const { return bytes_in_use_; }

 protected:
  // Backends call these from allocate and release.
  void count_allocation(void* p, size_t bytes) {
    ++allocations_, bytes_in_use_ += bytes;
    sizes_[p] = bytes;
  }
  void count_release(void* p) {
    const auto it = sizes_.find(p);
    if (it == sizes_.end()) return;
    bytes_in_use_ -= it->second;
    sizes_.erase(it);
  }

 private:
  int64_t allocations_ = 0;
  size_t bytes_in_use_ = 0;
  std::unordered_map<void*, size_t> sizes_;
};

std::unique_ptr<Backend> make_cpu_backend();
// Throws a braid::Error if Braid was built without CUDA or no GPU is visible.
std::unique_ptr<Backend> make_cuda_backend(int device_index);
// True when Braid was built with CUDA and at least one GPU is visible; how many are.
bool cuda_device_available();
int cuda_device_count();
// The current GPU's memory as cudaMemGetInfo reports it (zeros without CUDA).
struct DeviceMemory {
  size_t free = 0, total = 0;
};
DeviceMemory cuda_memory_info();

// Copies src into dst (same dtype and element count, both contiguous).
void copy_tensor(Backend& backend, const Tensor& dst, const Tensor& src, Stream s = {});

// Value of element i under spec, as computed by every backend (host and device code).
BRAID_HD float random_value(const RandomSpec& spec, uint64_t i) {
  if (spec.kind == RandomSpec::Kind::uniform) {
    const float u = philox::uniform(spec.seed, spec.tensor_id, i);
    return static_cast<float>(
        philox::add(double(spec.a), philox::mul(double(spec.b) - double(spec.a), double(u))));
  }
  const double z = philox::normal(spec.seed, spec.tensor_id, i);
  return static_cast<float>(philox::add(double(spec.a), philox::mul(double(spec.b), z)));
}
}  // namespace braid
