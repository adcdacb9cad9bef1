#include <cmath>
#include <cstring>

#include "layers/common/op_common.h"
#include "layers/elementwise/elementwise.h"
#include "runtime/parallel_for.h"

// A GPU call, then return (a build without CUDA never gets here: check_pair refuses GPU tensors).
#if defined(BRAID_WITH_CUDA)
#define BRAID_GPU_CALL(call) return call
#else
#define BRAID_GPU_CALL(call) \
  BRAID_FAIL("elementwise: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)")
#endif

namespace braid {
namespace {

// Both on the CPU with one dtype, or both contiguous on the GPU (true) with dtypes that
// `gpu_ok` accepts; the same element count either way.
bool check_pair(const char* op, const Tensor& y, const Tensor& x, bool gpu_ok) {
  BRAID_CHECK(y.numel() == x.numel(), op, ": ", y.describe(), " and ", x.describe(),
              " must have the same element count");
  if (y.device == Device::cuda || x.device == Device::cuda) {
#if !defined(BRAID_WITH_CUDA)
    (void)gpu_ok;
    BRAID_FAIL(op, ": tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
    require_gpu(op, {&y, &x});
    BRAID_CHECK(gpu_ok, op, " (CUDA): unsupported dtypes ", y.describe(), " and ", x.describe());
    return true;
#endif
  }
  BRAID_CHECK(y.dtype == x.dtype, op, ": ", y.describe(), " and ", x.describe(),
              " must have the same dtype");
  require_host(op, {&y, &x});
  return false;
}

bool bf16_or_f32(DType t) {
  return t == DType::bf16 || t == DType::f32;
}
[[maybe_unused]] EwKind kind(DType t) {
  return t == DType::bf16 ? EwKind::bf16 : EwKind::f32;
}

}  // namespace

void zero_fill(const Tensor& y, [[maybe_unused]] void* stream) {
  if (y.device == Device::cuda) {
    require_gpu("zero_fill", {&y});
    BRAID_GPU_CALL(zero_fill_cuda(y.data, y.nbytes(), stream));
  }
  require_host("zero_fill", {&y});
  std::memset(y.data, 0, y.nbytes());
}

void add_into(const Tensor& y, const Tensor& x, [[maybe_unused]] void* stream) {
  const bool ok =
      bf16_or_f32(y.dtype) && bf16_or_f32(x.dtype) && (y.dtype == x.dtype || y.dtype == DType::f32);
  if (check_pair("add_into", y, x, ok))
    BRAID_GPU_CALL(add_into_cuda(y.data, kind(y.dtype), x.data, kind(x.dtype), y.numel(), stream));
  dispatch_float(y.dtype, "add_into", [&]<typename T>() {
    T* yp = y.ptr<T>();
    const T* xp = x.ptr<T>();
    constexpr int64_t kBlock = 4096;
    const int64_t n = y.numel();
    parallel_for((n + kBlock - 1) / kBlock, [&](int64_t b) {
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) yp[i] += xp[i];
    });
  });
}

void cast_into(const Tensor& y, const Tensor& x, [[maybe_unused]] void* stream) {
  if (check_pair("cast_into", y, x, bf16_or_f32(y.dtype) && bf16_or_f32(x.dtype)))
    BRAID_GPU_CALL(cast_cuda(y.data, kind(y.dtype), x.data, kind(x.dtype), y.numel(), stream));
  std::memcpy(y.data, x.data, y.nbytes());
}

void neg_exp(const Tensor& a_log, const Tensor& a, [[maybe_unused]] void* stream) {
  const bool ok = a.dtype == DType::f32 && a_log.dtype == DType::f32;
  if (check_pair("neg_exp", a, a_log, ok))
    BRAID_GPU_CALL(neg_exp_cuda(a_log.ptr<float>(), a.ptr<float>(), a.numel(), stream));
  dispatch_float(a.dtype, "neg_exp", [&]<typename T>() {
    const T* lp = a_log.ptr<T>();
    T* ap = a.ptr<T>();
    for (int64_t i = 0; i < a.numel(); ++i) ap[i] = -std::exp(lp[i]);
  });
}

void neg_exp_backward(const Tensor& a, const Tensor& da, const Tensor& da_log,
                      [[maybe_unused]] void* stream) {
  const bool ok = a.dtype == DType::f32 && da.dtype == DType::f32 && da_log.dtype == DType::f32;
  const bool gpu = check_pair("neg_exp_backward", a, da, ok);
  check_pair("neg_exp_backward", a, da_log, ok);
  if (gpu)
    BRAID_GPU_CALL(neg_exp_backward_cuda(a.ptr<float>(), da.ptr<float>(), da_log.ptr<float>(),
                                         a.numel(), stream));
  dispatch_float(a.dtype, "neg_exp_backward", [&]<typename T>() {
    const T *ap = a.ptr<T>(), *g = da.ptr<T>();
    T* out = da_log.ptr<T>();
    for (int64_t i = 0; i < a.numel(); ++i) out[i] += g[i] * ap[i];
  });
}

}  // namespace braid
