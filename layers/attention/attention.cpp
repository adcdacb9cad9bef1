// Shape checks of attention (both devices) and its GPU dispatch: validates GPU tensors, sizes the
// backward's workspace and builds the kernel Params.
#include <algorithm>
#include <cmath>

#include "layers/attention/attention.h"
#include "layers/attention/attention_cuda.h"
#include "layers/common/op_common.h"

namespace braid {

AttentionDims attention_dims(const AttentionInputs& in, const Tensor& o, const Tensor& lse) {
  BRAID_CHECK(in.q && in.k && in.v, "attention: q, k, v are required");
  BRAID_CHECK(in.q->ndim == 4 && in.k->ndim == 4,
              "attention: expects q [B,T,H,P], k [B,T,Hk,P]; got ", in.q->describe(), ", ",
              in.k->describe());
  const AttentionDims d{in.q->size(0), in.q->size(1), in.q->size(2), in.k->size(2), in.q->size(3)};
  BRAID_CHECK(d.hk >= 1 && d.h % d.hk == 0, "attention: KV heads ", d.hk,
              " must divide query heads ", d.h);
  BRAID_CHECK(in.scale > 0, "attention: softmax scale must be positive, got ", in.scale);
  check_shape(*in.k, {d.b, d.t, d.hk, d.p});
  check_shape(*in.v, {d.b, d.t, d.hk, d.p});
  check_shape(o, {d.b, d.t, d.h, d.p});
  check_shape(lse, {d.b, d.h, d.t});
  if (in.seq_idx) {
    BRAID_CHECK(in.seq_idx->dtype == DType::i32, "attention: seq_idx must be i32");
    check_shape(*in.seq_idx, {d.b, d.t});
  }
  return d;
}

AttnGeometry attention_geometry(int64_t b, int64_t t, int64_t h, int64_t p) {
  AttnGeometry g;
  g.tq = (t + kAttnBwdRows - 1) / kAttnBwdRows * kAttnBwdRows;
  const int64_t lanes = b * h * g.tq;
  g.dq_acc = 0;
  g.delta = g.dq_acc + lanes * p;
  g.lse2 = g.delta + lanes;
  g.sem = g.lse2 + lanes;
  g.total = g.sem + lanes / kAttnBwdRows;
  return g;
}

int64_t attention_gpu_workspace_elems(const AttentionInputs& in) {
  BRAID_CHECK(in.q && in.k, "attention: q and k are required");
  return attention_geometry(in.q->size(0), in.q->size(1), in.q->size(2), in.q->size(3)).total;
}

#if defined(BRAID_WITH_CUDA)
namespace {

AttnParams gpu_params(const AttentionInputs& in, const Tensor& o, const Tensor& lse) {
  const AttentionDims d = attention_dims(in, o, lse);
  BRAID_CHECK(in.q->dtype == DType::bf16 || in.q->dtype == DType::f32,
              "attention (CUDA): q must be bf16 or f32 (the f32 path: attention_f32.cu), got ",
              in.q->describe());
  require_dtype("attention", in.q->dtype, {in.k, in.v, &o});
  require_dtype("attention", DType::f32, {&lse});
  require_gpu("attention", {in.q, in.k, in.v, in.seq_idx, &o, &lse});
  BRAID_CHECK(d.p == 64 || d.p == 128, "attention (CUDA): head dim ", d.p, " must be 64 or 128");
  BRAID_CHECK(d.b < 65536 && d.h < 65536, "attention (CUDA): batch ", d.b, " and heads ", d.h,
              " must be below 65536");
  BRAID_CHECK(d.t < (int64_t(1) << 30), "attention (CUDA): sequence length ", d.t,
              " must be below 2^30");
  AttnParams p;
  p.batch = int(d.b), p.seqlen = int(d.t), p.heads = int(d.h), p.kv_heads = int(d.hk);
  p.head_dim = int(d.p);
  p.scale = float(in.scale);
  p.scale_log2 = float(in.scale * 1.4426950408889634);
  p.q = in.q->data, p.k = in.k->data, p.v = in.v->data;
  p.seq_idx = in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr;
  if (in.rows) {
    p.rows.active = true;
    for (int i = 0; i < 2; ++i) {
      const int64_t lo = in.rows->begin[i], hi = std::max(lo, in.rows->end[i]);  // empty: ok
      BRAID_CHECK(lo >= 0 && hi <= d.t, "attention: rows [", lo, ", ", hi,
                  ") outside the sequence of ", d.t);
      p.rows.begin[i] = int(lo), p.rows.end[i] = int(hi);
    }
  }
  p.o = o.data;
  p.lse = lse.ptr<float>();
  p.geo = attention_geometry(d.b, d.t, d.h, d.p);
  p.deterministic = in.deterministic;
  p.use_wgmma = in.hopper;
  return p;
}

}  // namespace
#endif

void attention_forward_gpu(const AttentionInputs& in, const Tensor& o, const Tensor& lse) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)o, (void)lse;
  BRAID_FAIL("attention: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  const AttnParams p = gpu_params(in, o, lse);
  if (p.seqlen == 0) return;
  if (in.q->dtype == DType::f32)
    attention_fwd_f32_cuda(p, in.stream);
  else
    attention_fwd_cuda(p, in.stream);
#endif
}

void attention_backward_gpu(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                            const Tensor& dout, const Tensor& dq, const Tensor& dk,
                            const Tensor& dv) {
#if !defined(BRAID_WITH_CUDA)
  (void)in, (void)o, (void)lse, (void)dout, (void)dq, (void)dk, (void)dv;
  BRAID_FAIL("attention: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  AttnParams p = gpu_params(in, o, lse);
  check_shape(dout, {p.batch, p.seqlen, p.heads, p.head_dim});
  check_shape(dq, {p.batch, p.seqlen, p.heads, p.head_dim});
  check_shape(dk, {p.batch, p.seqlen, p.kv_heads, p.head_dim});
  check_shape(dv, {p.batch, p.seqlen, p.kv_heads, p.head_dim});
  require_dtype("attention", in.q->dtype, {&dout, &dq, &dk, &dv});
  require_gpu("attention", {&dout, &dq, &dk, &dv});
  BRAID_CHECK(in.workspace, "attention (CUDA): the backward needs a workspace of ", p.geo.total,
              " f32 elements (attention_gpu_workspace_elems)");
  require_dtype("attention", DType::f32, {in.workspace});
  require_gpu("attention", {in.workspace});
  BRAID_CHECK(in.workspace->numel() >= p.geo.total, "attention (CUDA): workspace ",
              in.workspace->describe(), " smaller than ", p.geo.total, " elements");
  p.dout = dout.data, p.dq = dq.data, p.dk = dk.data, p.dv = dv.data;
  p.ws = in.workspace->ptr<float>();
  if (p.seqlen == 0) return;
  if (in.q->dtype == DType::f32)
    attention_bwd_f32_cuda(p, in.stream);
  else
    attention_bwd_cuda(p, in.stream);
#endif
}

}  // namespace braid
