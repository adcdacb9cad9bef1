// Device dispatch of the causal conv1d: validates GPU tensors and builds the kernel Params.
#include "layers/causal_conv1d/causal_conv1d_gpu.h"
#include "layers/common/op_common.h"

namespace braid {

#if defined(BRAID_WITH_CUDA)
namespace {

Conv1dParams make_params(const Conv1dInputs& in, const ConvDims& d) {
  BRAID_CHECK(in.x->dtype == DType::bf16 || in.x->dtype == DType::f32,
              "causal_conv1d (CUDA): tensors must be bf16 or f32, got ", in.x->describe());
  require_gpu("causal_conv1d", {in.x, in.w, in.bias, in.seq_idx, in.initial_state});
  BRAID_CHECK(d.b < 65536 && d.t < (int64_t(1) << 30) && d.b * d.t * d.c < (int64_t(1) << 40),
              "causal_conv1d (CUDA): sizes too large (batch < 65536, length < 2^30)");
  Conv1dParams p;
  p.batch = int(d.b), p.seqlen = int(d.t), p.channels = int(d.c), p.width = int(d.w);
  p.bf16 = in.x->dtype == DType::bf16;
  p.silu = in.silu;
  p.x = in.x->data, p.w = in.w->data, p.bias = in.bias ? in.bias->data : nullptr;
  p.initial_state = in.initial_state ? in.initial_state->data : nullptr;
  p.seq_idx = in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr;
  return p;
}

}  // namespace
#endif

void causal_conv1d_forward_gpu(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)y, (void)final_state;
  BRAID_FAIL("causal_conv1d: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const ConvDims d = causal_conv1d_dims(in);
  Conv1dParams p = make_params(in, d);
  check_shape(y, {d.b, d.t, d.c});
  check_same_dtype(*in.x, y);
  if (final_state)
    check_shape(*final_state, {d.b, d.c, d.w - 1}), check_same_dtype(*in.x, *final_state);
  require_gpu("causal_conv1d", {&y, final_state});
  p.y = y.data;
  p.final_state = final_state ? final_state->data : nullptr;
  causal_conv1d_fwd_cuda(p, in.stream);
#endif
}

void causal_conv1d_backward_gpu(const Conv1dInputs& in, const Tensor& dy,
                                const Tensor* dfinal_state, const Conv1dGrads& g,
                                const Tensor* workspace) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)dy, (void)dfinal_state, (void)g, (void)workspace;
  BRAID_FAIL("causal_conv1d: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const ConvDims d = causal_conv1d_dims(in);
  Conv1dParams p = make_params(in, d);
  BRAID_CHECK(g.dx && g.dw, "causal_conv1d_backward: dx and dw are required");
  for (const Tensor* t : {&dy, g.dx}) check_shape(*t, {d.b, d.t, d.c});
  check_shape(*g.dw, {d.c, d.w});
  if (g.dbias) check_shape(*g.dbias, {d.c});
  for (const Tensor* t : {g.dinitial_state, dfinal_state})
    if (t) check_shape(*t, {d.b, d.c, d.w - 1});
  for (const Tensor* t : {&dy, g.dx, g.dinitial_state, dfinal_state})
    if (t) check_same_dtype(*in.x, *t);
  p.f32_grads = g.dw->dtype == DType::f32 && in.x->dtype == DType::bf16;
  for (const Tensor* t : {g.dw, g.dbias})
    if (t && !p.f32_grads) check_same_dtype(*in.x, *t);
  if (g.dbias) check_same_dtype(*g.dw, *g.dbias);
  require_gpu("causal_conv1d",
              {&dy, g.dx, g.dw, g.dbias, g.dinitial_state, dfinal_state, workspace});
  const int64_t need = conv1d_partial_elems(d.b, d.t, d.c, d.w);
  BRAID_CHECK(workspace && workspace->dtype == DType::f32 && workspace->numel() >= need,
              "causal_conv1d_backward (CUDA): needs an f32 workspace of ", need, " elements, got ",
              workspace ? workspace->describe() : std::string("none"));
  p.dy = dy.data;
  p.dfinal_state = dfinal_state ? dfinal_state->data : nullptr;
  p.dx = g.dx->data, p.dw = g.dw->data, p.dbias = g.dbias ? g.dbias->data : nullptr;
  p.dinitial_state = g.dinitial_state ? g.dinitial_state->data : nullptr;
  p.partial = workspace->ptr<float>();
  causal_conv1d_bwd_cuda(p, in.stream);
#endif
}

}  // namespace braid
