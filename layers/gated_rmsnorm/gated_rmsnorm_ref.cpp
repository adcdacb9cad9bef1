#include <cmath>

#include "layers/common/op_common.h"
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_gated(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups, const Tensor& y,
                 const Tensor& rstd) {
  gated_rmsnorm_check_shapes(x, z, w, groups, y, rstd);
  for (const Tensor* t : {&z, &w, &y, &rstd}) check_same_dtype(x, *t);
  require_host("gated_rmsnorm", {&x, &z, &w, &y, &rstd});
}

}  // namespace

void gated_rmsnorm_check_shapes(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                                const Tensor& y, const Tensor& rstd) {
  BRAID_CHECK(x.ndim == 2, "gated_rmsnorm: x must be [M,D], got ", x.describe());
  const int64_t m = x.size(0), d = x.size(1);
  BRAID_CHECK(groups >= 1 && d % groups == 0, "gated_rmsnorm: groups ", groups,
              " must divide the width ", d);
  check_shape(z, {m, d});
  check_shape(w, {d});
  check_shape(y, {m, d});
  check_shape(rstd, {m, groups});
}

int64_t gated_rmsnorm_workspace_elems(const Tensor& x) {
  if (x.device != Device::cuda) return 0;
  BRAID_CHECK(x.ndim == 2, "gated_rmsnorm: x must be [M,D], got ", x.describe());
  return gated_rmsnorm_row_blocks(x.size(0)) * x.size(1);
}

void gated_rmsnorm_forward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                           double eps, const Tensor& y, const Tensor& rstd, void* stream) {
  if (x.device == Device::cuda)
    return gated_rmsnorm_forward_gpu(x, z, w, groups, eps, y, rstd, stream);
  check_gated(x, z, w, groups, y, rstd);
  const int64_t m = x.size(0), d = x.size(1), gs = d / groups;
  dispatch_float(x.dtype, "gated_rmsnorm", [&]<typename T>() {
    const T *xp = x.ptr<T>(), *zp = z.ptr<T>(), *wp = w.ptr<T>();
    T *yp = y.ptr<T>(), *rp = rstd.ptr<T>();
    parallel_for(m * groups, [&](int64_t ig) {
      const int64_t i = ig / groups, off = i * d + (ig % groups) * gs;
      double ss = 0;
      for (int64_t j = 0; j < gs; ++j) {
        const double g = double(xp[off + j]) * silu(zp[off + j]);
        ss += g * g;
      }
      const T r = T(1.0 / std::sqrt(ss / gs + eps));
      rp[ig] = r;
      for (int64_t j = 0; j < gs; ++j)
        yp[off + j] = xp[off + j] * silu(zp[off + j]) * r * wp[off - i * d + j];
    });
  });
}

void gated_rmsnorm_backward(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                            const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                            const Tensor& dz, const Tensor& dw, const Tensor* workspace,
                            void* stream) {
  if (x.device == Device::cuda)
    return gated_rmsnorm_backward_gpu(x, z, w, groups, rstd, dy, dx, dz, dw, workspace, stream);
  check_gated(x, z, w, groups, dy, rstd);
  check_shape(dx, {x.size(0), x.size(1)});
  check_shape(dz, {x.size(0), x.size(1)});
  check_shape(dw, {x.size(1)});
  require_host("gated_rmsnorm", {&dx, &dz, &dw});
  const int64_t m = x.size(0), d = x.size(1), gs = d / groups;
  dispatch_float(x.dtype, "gated_rmsnorm", [&]<typename T>() {
    const T *xp = x.ptr<T>(), *zp = z.ptr<T>(), *wp = w.ptr<T>(), *rp = rstd.ptr<T>();
    const T* gp = dy.ptr<T>();
    T *dxp = dx.ptr<T>(), *dzp = dz.ptr<T>(), *dwp = dw.ptr<T>();
    parallel_for(m * groups, [&](int64_t ig) {
      const int64_t i = ig / groups, off = i * d + (ig % groups) * gs, woff = off - i * d;
      const T r = rp[ig];
      double dot = 0;
      for (int64_t j = 0; j < gs; ++j)
        dot += double(gp[off + j]) * wp[woff + j] * xp[off + j] * silu(zp[off + j]);
      const T c = T(dot) * r * r * r / T(gs);
      for (int64_t j = 0; j < gs; ++j) {
        const T zs = silu(zp[off + j]), g = xp[off + j] * zs;
        const T dg = r * wp[woff + j] * gp[off + j] - c * g;
        dxp[off + j] = dg * zs;
        dzp[off + j] = dg * xp[off + j] * silu_grad(zp[off + j]);
      }
    });
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < d; ++j)
        dwp[j] += gp[i * d + j] * xp[i * d + j] * silu(zp[i * d + j]) * rp[i * groups + j / gs];
  });
}

}  // namespace braid
