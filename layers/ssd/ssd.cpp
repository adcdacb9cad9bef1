// Device dispatch of SSD: validates GPU tensors, sizes the workspace and builds the kernel Params.
#include <algorithm>

#include <deque>
#include <optional>

#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"
#include "layers/ssd/ssd.h"
#include "layers/ssd/ssd_cuda.h"

namespace braid {

SsdGeometry ssd_geometry(int64_t b, int64_t t, int64_t h, int64_t p, int64_t g, int64_t n,
                         int64_t q, bool d_per_channel) {
  SsdGeometry s;
  s.chunks = (t + q - 1) / q;
  s.tpad = s.chunks * q;
  // The chunk scan and dB/dC blocks each take a split of the H/G heads of a group: as few
  // splits as give about 1024 blocks (one per 64-token tile, chunk, group and split), so the
  // head-independent work of a block (its score tiles) is shared by as many heads as the GPU's
  // occupancy allows, and dB/dC add few partial sums (splits x the size of dB).
  const int64_t hpg = h / g, blocks = b * s.chunks * g * (q / kSsdBlock);
  s.splits = std::clamp<int64_t>((1024 + blocks - 1) / blocks, 1, hpg);
  s.heads_per_split = (hpg + s.splits - 1) / s.splits;
  s.splits = (hpg + s.heads_per_split - 1) / s.heads_per_split;
  s.pass_blocks = p * n / 1024;
  s.d_cols = d_per_channel ? p : 1;
  const int64_t state = b * h * p * n, chunk_states = s.chunks * state, seq = b * h * s.tpad;
  auto half = [](int64_t e) { return (e + 7) / 8 * 4; };  // bf16 elements, 16-byte aligned
  auto take = [](int64_t& at, int64_t elems) {
    const int64_t off = at;
    at += (elems + 3) / 4 * 4;
    return off;
  };
  int64_t& ws = s.workspace_elems;
  s.dt = take(ws, seq);
  s.acs = take(ws, seq);
  s.states = take(ws, half(chunk_states));
  s.last = take(ws, state);
  s.docs = take(ws, b * s.tpad);
  int64_t& sc = s.scratch_elems;
  s.scores = take(sc, b * (s.tpad / kSsdBlock) * g * kSsdBlock * kSsdBlock / 2);
  s.local = take(sc, chunk_states);
  s.dstates = take(sc, half(chunk_states));
  s.r = take(sc, seq * (p / kSsdBlock));
  s.delta = take(sc, seq * (p / kSsdBlock));
  s.kappa = take(sc, b * h * s.chunks * s.pass_blocks);
  s.dbc = take(sc, 2 * s.splits * b * s.tpad * g * n);
  s.part_a = take(sc, b * s.chunks * h);
  s.part_bias = take(sc, b * s.chunks * h);
  s.part_d = take(sc, b * (s.tpad / kSsdBlock) * h * p);
  return s;
}

#if defined(BRAID_WITH_CUDA)
namespace {

// x, B, C and every tensor of their rows bf16 (the chunked kernels) or f32 (ssd_f32.cu).
bool f32_rows(const SsdInputs& in) {
  BRAID_CHECK(in.x->dtype == DType::bf16 || in.x->dtype == DType::f32,
              "ssd (CUDA): x must be bf16 or f32 (the f32 path: ssd_f32.cu), got ",
              in.x->describe());
  return in.x->dtype == DType::f32;
}

SsdParams forward_params(const SsdInputs& in, const SsdDims& d) {
  require_dtype("ssd", in.x->dtype, {in.B, in.C});
  require_dtype("ssd", DType::f32, {in.dt, in.A, in.D, in.dt_bias, in.initial_state});
  require_gpu("ssd",
              {in.x, in.dt, in.A, in.B, in.C, in.D, in.dt_bias, in.seq_idx, in.initial_state});
  BRAID_CHECK(d.p == 64 || d.p == 128, "ssd (CUDA): head dim ", d.p, " must be 64 or 128");
  BRAID_CHECK(d.n == 64 || d.n == 128 || d.n == 256, "ssd (CUDA): d_state ", d.n,
              " must be 64, 128 or 256");
  BRAID_CHECK(in.chunk == 64 || in.chunk == 128 || in.chunk == 256, "ssd (CUDA): chunk size ",
              in.chunk, " must be 64, 128 or 256");
  BRAID_CHECK(d.b < 65536, "ssd (CUDA): batch ", d.b, " too large (at most 65535)");
  SsdParams p;
  p.batch = int(d.b), p.seqlen = int(d.t), p.heads = int(d.h), p.head_dim = int(d.p);
  p.groups = int(d.g), p.d_state = int(d.n), p.chunk = int(in.chunk);
  p.dt_softplus = in.dt_softplus;
  p.dt_min = float(in.dt_min), p.dt_max = float(in.dt_max);
  p.d_per_channel = in.D && in.D->ndim == 2;
  p.hopper = in.hopper;
  p.geo = ssd_geometry(d.b, d.t, d.h, d.p, d.g, d.n, in.chunk, p.d_per_channel);
  p.x = in.x->data, p.B = in.B->data, p.C = in.C->data;
  p.dt = in.dt->ptr<float>(), p.A = in.A->ptr<float>();
  p.D = in.D ? in.D->ptr<float>() : nullptr;
  p.dt_bias = in.dt_bias ? in.dt_bias->ptr<float>() : nullptr;
  p.seq_idx = in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr;
  p.initial_state = in.initial_state ? in.initial_state->ptr<float>() : nullptr;
  return p;
}

// y_scan's pointer, checked (bf16 [B,T,H,P] on the GPU; the f32 path has none); null if absent.
void* y_scan_params(const SsdInputs& in, const SsdDims& d, bool f32) {
  if (!in.y_scan) return nullptr;
  BRAID_CHECK(!f32, "ssd (CUDA): y_scan is for bf16 tensors; the f32 path recomputes it");
  check_shape(*in.y_scan, {d.b, d.t, d.h, d.p});
  require_dtype("ssd", DType::bf16, {in.y_scan});
  require_gpu("ssd", {in.y_scan});
  return in.y_scan->data;
}

void check_workspace(const char* what, const Tensor& ws, int64_t elems) {
  require_dtype("ssd", DType::f32, {&ws});
  require_gpu("ssd", {&ws});
  BRAID_CHECK(ws.numel() >= elems, "ssd (CUDA): ", what, " ", ws.describe(), " smaller than ",
              elems, " elements");
}

// The scratch's pointer: in.scratch, checked, or (null) one from the stream-ordered pool, kept in
// `own` until the passes queued on in.stream are done with it.
float* scratch_params(const SsdInputs& in, std::optional<ScratchTensor>& own) {
  const int64_t elems = ssd_gpu_scratch_elems(in);
  if (elems == 0) return nullptr;
  if (!in.scratch)
    return own.emplace(DType::f32, std::vector<int64_t>{elems}, Device::cuda, in.stream)
        .t.ptr<float>();
  check_workspace("scratch", *in.scratch, elems);
  return in.scratch->ptr<float>();
}

}  // namespace
#endif

namespace {
SsdGeometry gpu_geometry(const SsdInputs& in) {
  const SsdDims d = ssd_dims(in);
  const int64_t q = std::max<int64_t>(in.chunk, 1);
  return ssd_geometry(d.b, d.t, d.h, d.p, d.g, d.n, q, in.D && in.D->ndim == 2);
}
}  // namespace

int64_t ssd_gpu_workspace_elems(const SsdInputs& in) {
  if (in.x->dtype == DType::f32) {
    const SsdDims d = ssd_dims(in);
    return ssd_f32_layout(d.b, d.t, d.h, d.p, d.n).total;
  }
  return gpu_geometry(in).workspace_elems;
}

int64_t ssd_gpu_scratch_elems(const SsdInputs& in) {
  return in.x->dtype == DType::f32 ? 0 : gpu_geometry(in).scratch_elems;
}

void ssd_forward_gpu(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                     const Tensor& workspace) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)y, (void)final_state, (void)workspace;
  BRAID_FAIL("ssd: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const SsdDims d = ssd_dims(in);
  SsdParams p = forward_params(in, d);
  const bool f32 = f32_rows(in);
  check_shape(y, {d.b, d.t, d.h, d.p});
  require_dtype("ssd", in.x->dtype, {&y});
  require_dtype("ssd", DType::f32, {final_state});
  if (final_state) check_shape(*final_state, {d.b, d.h, d.p, d.n});
  require_gpu("ssd", {&y, final_state});
  check_workspace("workspace", workspace, ssd_gpu_workspace_elems(in));
  std::optional<ScratchTensor> own;
  p.scratch = scratch_params(in, own);
  p.y = y.data;
  p.y_scan = y_scan_params(in, d, f32);
  p.final_state = final_state ? final_state->ptr<float>() : nullptr;
  p.ws = workspace.ptr<float>();
  if (f32)
    ssd_fwd_f32_cuda(p, in.stream);
  else
    ssd_fwd_cuda(p, in.stream);
#endif
}

void ssd_backward_gpu(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                      const SsdGrads& gr, const Tensor& workspace) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)dy, (void)dfinal_state, (void)gr, (void)workspace;
  BRAID_FAIL("ssd: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const SsdDims d = ssd_dims(in);
  SsdParams p = forward_params(in, d);
  const bool f32 = f32_rows(in);
  check_ssd_grads(in, d, dy, dfinal_state, gr);
  require_dtype("ssd", in.x->dtype, {&dy, gr.dx, gr.dB, gr.dC});
  require_dtype("ssd", DType::f32,
                {gr.ddt, gr.dA, gr.dD, gr.ddt_bias, gr.dinitial_state, dfinal_state});
  require_gpu("ssd", {&dy, gr.dx, gr.ddt, gr.dA, gr.dB, gr.dC, gr.dD, gr.ddt_bias,
                      gr.dinitial_state, dfinal_state});
  check_workspace("workspace", workspace, ssd_gpu_workspace_elems(in));
  std::optional<ScratchTensor> own;
  p.ws = workspace.ptr<float>(), p.scratch = scratch_params(in, own);
  p.dy = dy.data;
  p.y_scan = y_scan_params(in, d, f32);
  p.dfinal_state = dfinal_state ? dfinal_state->ptr<float>() : nullptr;
  p.dx = gr.dx->data, p.dB = gr.dB->data, p.dC = gr.dC->data;
  p.ddt = gr.ddt->ptr<float>(), p.dA = gr.dA->ptr<float>();
  p.dD = gr.dD ? gr.dD->ptr<float>() : nullptr;
  p.ddt_bias = gr.ddt_bias ? gr.ddt_bias->ptr<float>() : nullptr;
  p.dinitial_state = gr.dinitial_state ? gr.dinitial_state->ptr<float>() : nullptr;
  if (f32)
    ssd_bwd_f32_cuda(p, in.stream);
  else
    ssd_bwd_cuda(p, in.stream);
#endif
}

void ssd_initial_state_grad(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                            const Tensor& dinitial_state, const Tensor& workspace) {
  const SsdDims d = ssd_dims(in);
  check_shape(dinitial_state, {d.b, d.h, d.p, d.n});
#if defined(BRAID_WITH_CUDA)
  if (in.x->device == Device::cuda && in.x->dtype == DType::bf16) {
    SsdParams p = forward_params(in, d);
    check_shape(dy, {d.b, d.t, d.h, d.p});
    if (dfinal_state) check_shape(*dfinal_state, {d.b, d.h, d.p, d.n});
    require_dtype("ssd", DType::bf16, {&dy});
    require_dtype("ssd", DType::f32, {&dinitial_state, dfinal_state});
    require_gpu("ssd", {&dy, &dinitial_state, dfinal_state});
    check_workspace("workspace", workspace, ssd_gpu_workspace_elems(in));
    std::optional<ScratchTensor> own;
    p.ws = workspace.ptr<float>(), p.scratch = scratch_params(in, own), p.dy = dy.data;
    p.dfinal_state = dfinal_state ? dfinal_state->ptr<float>() : nullptr;
    p.dinitial_state = dinitial_state.ptr<float>();
    ssd_state_grad_cuda(p, in.stream);
    return;
  }
#endif
  std::deque<ScratchTensor> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t, in.stream); };
  ssd_backward(in, dy, dfinal_state,
               {like(in.x), like(in.dt), like(in.A), like(in.B), like(in.C), like(in.D),
                like(in.dt_bias), &dinitial_state},
               workspace);
}

}  // namespace braid
