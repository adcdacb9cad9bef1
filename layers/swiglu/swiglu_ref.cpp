#include "layers/common/op_common.h"
#include "layers/swiglu/swiglu.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_swiglu(const Tensor& a, const Tensor& b, const Tensor& y) {
  BRAID_CHECK(a.ndim == 2, "swiglu: a must be [M,F], got ", a.describe());
  check_shape(b, {a.size(0), a.size(1)});
  check_shape(y, {a.size(0), a.size(1)});
  check_same_dtype(a, b);
  check_same_dtype(a, y);
  if (a.device == Device::cuda) {
#if !defined(BRAID_WITH_CUDA)
    BRAID_FAIL("swiglu: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
    BRAID_CHECK(a.dtype == DType::bf16 || a.dtype == DType::f32,
                "swiglu (CUDA): tensors must be bf16 or f32, got ", a.describe());
    require_gpu("swiglu", {&a, &b, &y});
#endif
  } else {
    require_host("swiglu", {&a, &b, &y});
  }
}

}  // namespace

void swiglu_forward(const Tensor& a, const Tensor& b, const Tensor& y, void* stream) {
  check_swiglu(a, b, y);
#if defined(BRAID_WITH_CUDA)
  if (a.device == Device::cuda)
    return swiglu_forward_cuda(a.data, b.data, y.data, a.numel(), a.dtype == DType::bf16, stream);
#else
  (void)stream;
#endif
  dispatch_float(a.dtype, "swiglu", [&]<typename T>() {
    const T *ap = a.ptr<T>(), *bp = b.ptr<T>();
    T* yp = y.ptr<T>();
    const int64_t f = a.size(1);
    parallel_for(a.size(0), [&](int64_t i) {
      for (int64_t j = i * f; j < (i + 1) * f; ++j) yp[j] = silu(ap[j]) * bp[j];
    });
  });
}

void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dy, const Tensor& da,
                     const Tensor& db, void* stream) {
  check_swiglu(a, b, dy);
  check_swiglu(a, da, db);
#if defined(BRAID_WITH_CUDA)
  if (a.device == Device::cuda)
    return swiglu_backward_cuda(a.data, b.data, dy.data, da.data, db.data, a.numel(),
                                a.dtype == DType::bf16, stream);
#else
  (void)stream;
#endif
  dispatch_float(a.dtype, "swiglu", [&]<typename T>() {
    const T *ap = a.ptr<T>(), *bp = b.ptr<T>(), *g = dy.ptr<T>();
    T *dap = da.ptr<T>(), *dbp = db.ptr<T>();
    const int64_t f = a.size(1);
    parallel_for(a.size(0), [&](int64_t i) {
      for (int64_t j = i * f; j < (i + 1) * f; ++j) {
        dap[j] = g[j] * bp[j] * silu_grad(ap[j]);
        dbp[j] = g[j] * silu(ap[j]);
      }
    });
  });
}

}  // namespace braid
