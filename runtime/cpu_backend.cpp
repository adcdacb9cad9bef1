#include <chrono>
#include <cstdlib>
#include <cstring>

#include "runtime/backend.h"

namespace braid {
namespace {

template <typename T>
void fill_as(const Tensor& t, double value) {
  T* p = static_cast<T*>(t.data);
  const int64_t n = t.numel();
  T v;
  if constexpr (std::is_same_v<T, bf16>) {
    v = to_bf16(static_cast<float>(value));
  } else if constexpr (std::is_same_v<T, f16>) {
    v = to_f16(static_cast<float>(value));
  } else {
    v = static_cast<T>(value);
  }
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu; }

  void* allocate(size_t bytes) override {
    const size_t rounded = (bytes + 255) / 256 * 256;
    void* p = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
    BRAID_CHECK(p != nullptr, "host allocation of ", bytes, " bytes failed");
    count_allocation(p, rounded);
    return p;
  }
  void release(void* p) override {
    count_release(p);
    std::free(p);
  }
  void* allocate_host(size_t bytes) override {
    void* p = std::malloc(bytes == 0 ? 1 : bytes);
    BRAID_CHECK(p != nullptr, "host allocation of ", bytes, " bytes failed");
    return p;
  }
  void release_host(void* p) override { std::free(p); }

  void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes,
            Stream) override {
    BRAID_CHECK(dst_device == Device::cpu && src_device == Device::cpu,
                "the CPU backend copies only host memory");
    if (bytes) std::memmove(dst, src, bytes);
  }

  void fill(const Tensor& t, double value, Stream) override {
    BRAID_CHECK(t.is_contiguous() && t.device == Device::cpu,
                "fill needs a contiguous host tensor: ", t.describe());
    switch (t.dtype) {
      case DType::f32:
        return fill_as<float>(t, value);
      case DType::f64:
        return fill_as<double>(t, value);
      case DType::bf16:
        return fill_as<bf16>(t, value);
      case DType::f16:
        return fill_as<f16>(t, value);
      case DType::i32:
        return fill_as<int32_t>(t, value);
      case DType::i64:
        return fill_as<int64_t>(t, value);
      case DType::u8:
        return fill_as<uint8_t>(t, value);
    }
  }

  void fill_random(const Tensor& t, const RandomSpec& spec, Stream) override {
    BRAID_CHECK(t.is_contiguous() && t.device == Device::cpu && dtype_is_float(t.dtype),
                "fill_random needs a contiguous floating-point host tensor: ", t.describe());
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) {
      const float v = random_value(spec, static_cast<uint64_t>(i));
      switch (t.dtype) {
        case DType::f32:
          static_cast<float*>(t.data)[i] = v;
          break;
        case DType::f64:
          static_cast<double*>(t.data)[i] = v;
          break;
        case DType::bf16:
          static_cast<bf16*>(t.data)[i] = to_bf16(v);
          break;
        case DType::f16:
          static_cast<f16*>(t.data)[i] = to_f16(v);
          break;
        default:
          break;
      }
    }
  }

  Stream create_stream() override { return {}; }
  void destroy_stream(Stream) override {}
  // An event is the moment of its last record (work on the CPU is done when recorded).
  using Clock = std::chrono::steady_clock;
  Event create_event(bool) override { return {new Clock::time_point()}; }
  void destroy_event(Event e) override { delete static_cast<Clock::time_point*>(e.handle); }
  void record(Event e, Stream) override {
    *static_cast<Clock::time_point*>(e.handle) = Clock::now();
  }
  void wait(Stream, Event) override {}
  void synchronize(Stream) override {}
  bool finished(Event) override { return true; }
  double elapsed_ms(Event start, Event end) override {
    return std::chrono::duration<double, std::milli>(*static_cast<Clock::time_point*>(end.handle) -
                                                     *static_cast<Clock::time_point*>(start.handle))
        .count();
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<CpuBackend>();
}

void copy_tensor(Backend& backend, const Tensor& dst, const Tensor& src, Stream s) {
  BRAID_CHECK(dst.dtype == src.dtype && dst.numel() == src.numel() && dst.is_contiguous() &&
                  src.is_contiguous(),
              "copy_tensor needs contiguous tensors of one dtype and size: ", dst.describe(),
              " <- ", src.describe());
  backend.copy(dst.data, dst.device, src.data, src.device, dst.nbytes(), s);
}

#if !defined(BRAID_WITH_CUDA)
std::unique_ptr<Backend> make_cuda_backend(int) {
  BRAID_FAIL("this build of Braid has no CUDA backend (configure with -DBRAID_CUDA=ON)");
}
int cuda_device_count() {
  return 0;
}
bool cuda_device_available() {
  return false;
}
DeviceMemory cuda_memory_info() {
  return {};
}
#endif

}  // namespace braid
