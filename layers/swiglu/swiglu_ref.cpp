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
  require_host("swiglu", {&a, &b, &y});
}

}  // namespace

void swiglu_forward(const Tensor& a, const Tensor& b, const Tensor& y) {
  check_swiglu(a, b, y);
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
                     const Tensor& db) {
  check_swiglu(a, b, dy);
  check_swiglu(a, da, db);
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
