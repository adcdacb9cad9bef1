#include <cmath>

#include "layers/common/op_common.h"
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "layers/rmsnorm/rmsnorm.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_rmsnorm(const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd) {
  BRAID_CHECK(x.ndim == 2, "rmsnorm: x must be [M,D], got ", x.describe());
  const int64_t m = x.size(0), d = x.size(1);
  check_shape(w, {d});
  check_shape(y, {m, d});
  check_shape(rstd, {m});
  check_same_dtype(x, w);
  check_same_dtype(x, y);
  check_same_dtype(x, rstd);
  require_host("rmsnorm", {&x, &w, &y, &rstd});
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                     const Tensor& rstd, void* stream) {
  if (x.device == Device::cuda) {
    // The gated kernels without a gate, one group: rstd [M] is their [M,1].
    gated_rmsnorm_forward_gpu(x, x, w, 1, eps, y, rstd.reshape({x.size(0), 1}), stream, false);
    return;
  }
  check_rmsnorm(x, w, y, rstd);
  const int64_t m = x.size(0), d = x.size(1);
  dispatch_float(x.dtype, "rmsnorm", [&]<typename T>() {
    const T *xp = x.ptr<T>(), *wp = w.ptr<T>();
    T *yp = y.ptr<T>(), *rp = rstd.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      const T* xr = xp + i * d;
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * xr[j];
      const T r = T(1.0 / std::sqrt(ss / d + eps));
      rp[i] = r;
      for (int64_t j = 0; j < d; ++j) yp[i * d + j] = xr[j] * r * wp[j];
    });
  });
}

int64_t rmsnorm_workspace_elems(const Tensor& x) {
  return gated_rmsnorm_workspace_elems(x);
}

void add_rmsnorm_forward(const Tensor& a, const Tensor& b, const Tensor& w, double eps,
                         const Tensor& s, const Tensor& y, const Tensor& rstd, void* stream) {
  BRAID_CHECK(a.ndim == 2 && b.numel() == a.numel() && s.data != a.data && s.data != b.data,
              "add_rmsnorm: a [M,D], b and s of its size, s apart from a and b; got ", a.describe(),
              ", ", b.describe(), ", ", s.describe());
  if (a.device == Device::cuda) {
    const Tensor b2 = b.reshape({a.size(0), a.size(1)});
    gated_rmsnorm_forward_gpu(a, a, w, 1, eps, y, rstd.reshape({a.size(0), 1}), stream, false, &b2,
                              &s);
    return;
  }
  check_rmsnorm(a, w, y, rstd);
  check_shape(s, {a.size(0), a.size(1)});
  check_same_dtype(a, b), check_same_dtype(a, s);
  require_host("add_rmsnorm", {&b, &s});
  dispatch_float(a.dtype, "add_rmsnorm", [&]<typename T>() {
    const T *ap = a.ptr<T>(), *bp = b.ptr<T>();
    T* sp = s.ptr<T>();
    parallel_for(a.size(0), [&](int64_t i) {
      for (int64_t j = i * a.size(1); j < (i + 1) * a.size(1); ++j) sp[j] = ap[j] + bp[j];
    });
  });
  rmsnorm_forward(s, w, eps, y, rstd, stream);
}

void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, const Tensor* workspace, void* stream,
                      bool accumulate_dx) {
  if (x.device == Device::cuda) {
    gated_rmsnorm_backward_gpu(x, x, w, 1, rstd.reshape({x.size(0), 1}), dy, dx, dx, dw, workspace,
                               stream, false, accumulate_dx);
    return;
  }
  check_rmsnorm(x, w, dy, rstd);
  check_shape(dx, {x.size(0), x.size(1)});
  check_shape(dw, {x.size(1)});
  require_host("rmsnorm", {&dx, &dw});
  const int64_t m = x.size(0), d = x.size(1);
  dispatch_float(x.dtype, "rmsnorm", [&]<typename T>() {
    const T *xp = x.ptr<T>(), *wp = w.ptr<T>(), *rp = rstd.ptr<T>(), *g = dy.ptr<T>();
    T *dxp = dx.ptr<T>(), *dwp = dw.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      const T *xr = xp + i * d, *gr = g + i * d;
      const T r = rp[i];
      double dot = 0;
      for (int64_t j = 0; j < d; ++j) dot += double(gr[j]) * wp[j] * xr[j];
      const T c = T(dot) * r * r * r / T(d);
      for (int64_t j = 0; j < d; ++j) {
        const T v = r * wp[j] * gr[j] - c * xr[j];
        dxp[i * d + j] = accumulate_dx ? dxp[i * d + j] + v : v;
      }
    });
    for (int64_t i = 0; i < m; ++i) {
      const T r = rp[i];
      for (int64_t j = 0; j < d; ++j) dwp[j] += g[i * d + j] * xp[i * d + j] * r;
    }
  });
}

}  // namespace braid
