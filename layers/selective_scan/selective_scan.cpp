// Device dispatch of the selective scan: validates GPU tensors and builds the kernel Params.
#include "layers/selective_scan/selective_scan.h"

#include <optional>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"
#include "layers/selective_scan/selective_scan_cuda.h"

namespace braid {

#if defined(BRAID_WITH_CUDA)
namespace {

// Checks the inputs and fills the forward part of the Params.
ScanParams forward_params(const ScanInputs& in, const ScanDims& d) {
  const DType act = in.u->dtype;
  BRAID_CHECK(act == DType::bf16 || act == DType::f32,
              "selective_scan (CUDA): activations must be bf16 or f32, got ", in.u->describe());
  for (const Tensor* t : {in.delta, in.B, in.C, in.z})
    if (t) check_same_dtype(*in.u, *t);
  require_dtype("selective_scan", DType::f32, {in.A, in.D, in.delta_bias, in.initial_state});
  require_gpu("selective_scan", {in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.delta_bias,
                                 in.seq_idx, in.initial_state});
  BRAID_CHECK(d.b < 65536 && d.t < (int64_t(1) << 30) && d.b * d.t * d.c < (int64_t(1) << 40),
              "selective_scan (CUDA): sizes too large (batch < 65536, length < 2^30)");
  ScanParams p;
  p.batch = int(d.b), p.seqlen = int(d.t), p.channels = int(d.c), p.d_state = int(d.n),
  p.groups = int(d.g);
  p.bf16 = act == DType::bf16;
  p.delta_softplus = in.delta_softplus;
  p.fwd_lanes = in.fwd_lanes;
  p.u = in.u->data, p.delta = in.delta->data, p.z = in.z ? in.z->data : nullptr;
  p.B = in.B->data, p.C = in.C->data;
  p.A = in.A->ptr<float>();
  p.D = in.D ? in.D->ptr<float>() : nullptr;
  p.delta_bias = in.delta_bias ? in.delta_bias->ptr<float>() : nullptr;
  p.seq_idx = in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr;
  p.initial_state = in.initial_state ? in.initial_state->ptr<float>() : nullptr;
  return p;
}

void check_workspace(const char* what, const Tensor& ws, int64_t elems) {
  require_dtype("selective_scan", DType::f32, {&ws});
  require_gpu("selective_scan", {&ws});
  BRAID_CHECK(ws.numel() >= elems, "selective_scan (CUDA): ", what, " ", ws.describe(),
              " smaller than ", elems, " elements");
}

}  // namespace
#endif

void selective_scan_forward_gpu(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                                const Tensor* workspace) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)y, (void)final_state, (void)workspace;
  BRAID_FAIL("selective_scan: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const ScanDims d = selective_scan_dims(in);
  ScanParams p = forward_params(in, d);
  check_shape(y, {d.b, d.t, d.c});
  check_same_dtype(*in.u, y);
  require_dtype("selective_scan", DType::f32, {final_state});
  if (final_state) check_shape(*final_state, {d.b, d.c, d.n});
  require_gpu("selective_scan", {&y, final_state});
  if (workspace)
    check_workspace("workspace", *workspace,
                    scan_geometry(d.b, d.t, d.c, d.n, d.g).workspace_elems());
  p.y = y.data;
  p.final_state = final_state ? final_state->ptr<float>() : nullptr;
  p.chunk_states = workspace ? workspace->ptr<float>() : nullptr;
  selective_scan_fwd_cuda(p, in.stream);
#endif
}

void selective_scan_backward_gpu(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                 const ScanGrads& gr, const Tensor& workspace) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)dy, (void)dfinal_state, (void)gr, (void)workspace;
  BRAID_FAIL("selective_scan: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const ScanDims d = selective_scan_dims(in);
  ScanParams p = forward_params(in, d);
  check_scan_grads(in, d, dy, dfinal_state, gr);
  for (const Tensor* t : {&dy, gr.du, gr.ddelta, gr.dz, gr.dB, gr.dC})
    if (t) check_same_dtype(*in.u, *t);
  require_dtype("selective_scan", DType::f32,
                {gr.dA, gr.dD, gr.ddelta_bias, gr.dinitial_state, dfinal_state});
  require_gpu("selective_scan", {&dy, gr.du, gr.ddelta, gr.dA, gr.dB, gr.dC, gr.dD, gr.dz,
                                 gr.ddelta_bias, gr.dinitial_state, dfinal_state});
  const ScanGeometry geo = scan_geometry(d.b, d.t, d.c, d.n, d.g);
  check_workspace("workspace", workspace, geo.workspace_elems());
  std::optional<ScratchTensor> own;  // the scratch, where the caller gives none
  if (in.scratch)
    check_workspace("scratch", *in.scratch, geo.scratch_elems());
  else
    own.emplace(DType::f32, std::vector<int64_t>{geo.scratch_elems()}, Device::cuda, in.stream);
  p.chunk_states = workspace.ptr<float>();
  p.partial_bc = (in.scratch ? *in.scratch : own->t).ptr<float>();
  p.partial_a = p.partial_bc + geo.partial_bc_elems;
  p.partial_d = p.partial_a + geo.partial_a_elems;
  p.dy = dy.data;
  p.du = gr.du->data, p.ddelta = gr.ddelta->data, p.dz = gr.dz ? gr.dz->data : nullptr;
  p.dB = gr.dB->data, p.dC = gr.dC->data;
  p.dA = gr.dA->ptr<float>();
  p.dD = gr.dD ? gr.dD->ptr<float>() : nullptr;
  p.ddelta_bias = gr.ddelta_bias ? gr.ddelta_bias->ptr<float>() : nullptr;
  p.dinitial_state = gr.dinitial_state ? gr.dinitial_state->ptr<float>() : nullptr;
  p.dfinal_state = dfinal_state ? dfinal_state->ptr<float>() : nullptr;
  selective_scan_bwd_cuda(p, in.stream);
#endif
}

}  // namespace braid
