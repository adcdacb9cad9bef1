// Device dispatch of the gated RMSNorm: validates GPU tensors and builds the kernel Params.
#include "layers/gated_rmsnorm/gated_rmsnorm.h"
#include "layers/common/op_common.h"
#include "layers/gated_rmsnorm/gated_rmsnorm_cuda.h"

namespace braid {

#if defined(BRAID_WITH_CUDA)
namespace {

GatedNormParams make_params(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                            const Tensor& y, const Tensor& rstd) {
  gated_rmsnorm_check_shapes(x, z, w, groups, y, rstd);
  BRAID_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f32,
              "gated_rmsnorm (CUDA): activations must be bf16 or f32, got ", x.describe());
  for (const Tensor* t : {&z, &y}) check_same_dtype(x, *t);
  require_dtype("gated_rmsnorm", DType::f32, {&w, &rstd});
  require_gpu("gated_rmsnorm", {&x, &z, &w, &y, &rstd});
  BRAID_CHECK(x.size(1) < (int64_t(1) << 30), "gated_rmsnorm (CUDA): width ", x.size(1),
              " too large");
  GatedNormParams p;
  p.rows = x.size(0), p.width = int(x.size(1)), p.groups = int(groups);
  p.bf16 = x.dtype == DType::bf16;
  p.x = x.data, p.z = z.data, p.w = w.ptr<float>();
  return p;
}

}  // namespace
#endif

void gated_rmsnorm_forward_gpu(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                               double eps, const Tensor& y, const Tensor& rstd, void* stream,
                               bool gated, const Tensor* residual, const Tensor* sum) {
#if !defined(BRAID_WITH_CUDA)
  (void)x, (void)z, (void)w, (void)groups, (void)eps, (void)y, (void)rstd, (void)stream,
      (void)gated, (void)residual, (void)sum;
  BRAID_FAIL("gated_rmsnorm: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  GatedNormParams p = make_params(x, z, w, groups, y, rstd);
  p.eps = float(eps);
  if (!gated) p.z = nullptr;
  p.y = y.data, p.rstd = rstd.ptr<float>();
  if (residual) {
    BRAID_CHECK(!gated && sum, "gated_rmsnorm: a residual needs the plain norm and a sum output");
    for (const Tensor* t : {residual, sum})
      check_shape(*t, {x.size(0), x.size(1)}), check_same_dtype(x, *t);
    require_gpu("rmsnorm", {residual, sum});
    p.residual = residual->data, p.sum = sum->data;
  }
  gated_rmsnorm_fwd_cuda(p, stream);
#endif
}

void gated_rmsnorm_backward_gpu(const Tensor& x, const Tensor& z, const Tensor& w, int64_t groups,
                                const Tensor& rstd, const Tensor& dy, const Tensor& dx,
                                const Tensor& dz, const Tensor& dw, const Tensor* workspace,
                                void* stream, bool gated, bool accumulate_dx) {
#if !defined(BRAID_WITH_CUDA)
  (void)x, (void)z, (void)w, (void)groups, (void)rstd, (void)dy, (void)dx, (void)dz, (void)dw,
      (void)workspace, (void)stream, (void)gated, (void)accumulate_dx;
  BRAID_FAIL("gated_rmsnorm: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  GatedNormParams p = make_params(x, z, w, groups, dy, rstd);
  check_shape(dx, {x.size(0), x.size(1)});
  check_shape(dz, {x.size(0), x.size(1)});
  check_shape(dw, {x.size(1)});
  for (const Tensor* t : {&dx, &dz}) check_same_dtype(x, *t);
  require_dtype("gated_rmsnorm", DType::f32, {&dw});
  require_gpu("gated_rmsnorm", {&dx, &dz, &dw, workspace});
  BRAID_CHECK(workspace, "gated_rmsnorm (CUDA): the backward needs a workspace of ",
              gated_rmsnorm_workspace_elems(x), " f32 elements");
  require_dtype("gated_rmsnorm", DType::f32, {workspace});
  BRAID_CHECK(workspace->numel() >= gated_rmsnorm_workspace_elems(x),
              "gated_rmsnorm (CUDA): workspace ", workspace->describe(), " smaller than ",
              gated_rmsnorm_workspace_elems(x), " elements");
  if (!gated) p.z = nullptr;
  p.dy = dy.data, p.rstd_in = rstd.ptr<float>();
  p.dx = dx.data, p.dz = dz.data, p.dw = dw.ptr<float>();
  p.partial = workspace->ptr<float>();
  BRAID_CHECK(!accumulate_dx || !gated, "gated_rmsnorm: accumulate_dx is for the plain norm");
  p.accumulate_dx = accumulate_dx;
  gated_rmsnorm_bwd_cuda(p, stream);
#endif
}

}  // namespace braid
