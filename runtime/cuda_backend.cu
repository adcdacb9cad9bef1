// The CUDA backend: device memory, async copies and fills on caller-supplied streams.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime/backend.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_convert.cuh"

namespace braid {
namespace {

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, T v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

template <typename T>
__global__ void fill_random_kernel(T* p, int64_t n, RandomSpec spec) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = from_float<T>(random_value(spec, static_cast<uint64_t>(i)));
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

cudaStream_t as_cuda(Stream s) {
  return static_cast<cudaStream_t>(s.handle);
}

cudaMemcpyKind copy_kind(Device dst, Device src) {
  if (dst == Device::cuda && src == Device::cuda) return cudaMemcpyDeviceToDevice;
  if (dst == Device::cuda) return cudaMemcpyHostToDevice;
  if (src == Device::cuda) return cudaMemcpyDeviceToHost;
  return cudaMemcpyHostToHost;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device_index) : device_index_(device_index) {
    CUDA_CHECK(cudaSetDevice(device_index));
    // The stream-ordered pool (cudaMallocAsync: context parallelism's scratch) keeps what is
    // freed, instead of handing it back to the device at every synchronisation, so that each
    // step's scratch is not mapped again.
    cudaMemPool_t pool;
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_index));
    uint64_t keep = UINT64_MAX;
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  }
  Device device() const override { return Device::cuda; }

  void* allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes == 0 ? 256 : bytes);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // clears the error: the process goes on to report it
      size_t free = 0, total = 0;
      CUDA_CHECK(cudaMemGetInfo(&free, &total));
      auto mib = [](size_t b) { return std::to_string(b >> 20); };
      throw OutOfMemory("GPU " + std::to_string(device_index_) + " is out of memory: " +
                        mib(bytes) + " MiB asked, " + mib(free) + " MiB free of " + mib(total) +
                        " (Braid holds " + mib(bytes_in_use()) + " MiB)");
    }
    CUDA_CHECK(err);
    count_allocation(p, bytes);
    return p;
  }
  void release(void* p) override {
    count_release(p);
    CUDA_CHECK(cudaFree(p));
  }
  void* allocate_host(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocDefault);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      throw OutOfMemory("page-locked host memory of " + std::to_string(bytes >> 20) +
                        " MiB could not be allocated");
    }
    CUDA_CHECK(err);
    return p;
  }
  void release_host(void* p) override { CUDA_CHECK(cudaFreeHost(p)); }

  void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes,
            Stream s) override {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, copy_kind(dst_device, src_device), as_cuda(s)));
  }

  void fill(const Tensor& t, double value, Stream s) override {
    BRAID_CHECK(t.is_contiguous() && t.device == Device::cuda,
                "fill needs a contiguous device tensor: ", t.describe());
    const int64_t n = t.numel();
    if (n == 0) return;
    const cudaStream_t st = as_cuda(s);
    if (value == 0.0) {  // all bits zero in every dtype: the copy engine's memset
      CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), st));
      return;
    }
    switch (t.dtype) {
      case DType::f32:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<float>(), n, float(value));
        break;
      case DType::f64:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<double>(), n, value);
        break;
      case DType::bf16:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(static_cast<__nv_bfloat16*>(t.data), n,
                                                 __float2bfloat16_rn(float(value)));
        break;
      case DType::f16:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(static_cast<__half*>(t.data), n,
                                                 __float2half_rn(float(value)));
        break;
      case DType::i32:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<int32_t>(), n, int32_t(value));
        break;
      case DType::i64:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<int64_t>(), n, int64_t(value));
        break;
      case DType::u8:
        fill_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<uint8_t>(), n, uint8_t(value));
        break;
    }
    CUDA_CHECK(cudaGetLastError());
  }

  void fill_random(const Tensor& t, const RandomSpec& spec, Stream s) override {
    BRAID_CHECK(t.is_contiguous() && t.device == Device::cuda && dtype_is_float(t.dtype),
                "fill_random needs a contiguous floating-point device tensor: ", t.describe());
    const int64_t n = t.numel();
    if (n == 0) return;
    const cudaStream_t st = as_cuda(s);
    switch (t.dtype) {
      case DType::f32:
        fill_random_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<float>(), n, spec);
        break;
      case DType::f64:
        fill_random_kernel<<<grid_for(n), 256, 0, st>>>(t.ptr<double>(), n, spec);
        break;
      case DType::bf16:
        fill_random_kernel<<<grid_for(n), 256, 0, st>>>(static_cast<__nv_bfloat16*>(t.data), n,
                                                        spec);
        break;
      case DType::f16:
        fill_random_kernel<<<grid_for(n), 256, 0, st>>>(static_cast<__half*>(t.data), n, spec);
        break;
      default:
        break;
    }
    CUDA_CHECK(cudaGetLastError());
  }

  Stream create_stream() override {
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return Stream{s};
  }
  void destroy_stream(Stream s) override { CUDA_CHECK(cudaStreamDestroy(as_cuda(s))); }
  Event create_event(bool timing) override {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
    return Event{e};
  }
  void destroy_event(Event e) override {
    CUDA_CHECK(cudaEventDestroy(static_cast<cudaEvent_t>(e.handle)));
  }
  void record(Event e, Stream s) override {
    CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e.handle), as_cuda(s)));
  }
  void wait(Stream s, Event e) override {
    CUDA_CHECK(cudaStreamWaitEvent(as_cuda(s), static_cast<cudaEvent_t>(e.handle), 0));
  }
  void synchronize(Stream s) override { CUDA_CHECK(cudaStreamSynchronize(as_cuda(s))); }
  bool finished(Event e) override {
    const cudaError_t q = cudaEventQuery(static_cast<cudaEvent_t>(e.handle));
    if (q == cudaErrorNotReady) return false;
    CUDA_CHECK(q);
    return true;
  }
  double elapsed_ms(Event start, Event end) override {
    CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end.handle)));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.handle),
                                    static_cast<cudaEvent_t>(end.handle)));
    return ms;
  }

 private:
  int device_index_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  return std::make_unique<CudaBackend>(device_index);
}

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

bool cuda_device_available() {
  return cuda_device_count() > 0;
}

DeviceMemory cuda_memory_info() {
  DeviceMemory m;
  CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

}  // namespace braid
