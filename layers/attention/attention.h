// Causal attention with grouped KV heads (GQA/MQA), no biases; query head h reads KV head
// h / (H/Hk). Documents of a packed row never attend to each other (seq_idx).
//   s_ts = scale * q_t . k_s   for s <= t in the document of t
//   o_t  = sum_s softmax_s(s_ts) v_s;   lse_t = log sum_s exp(s_ts)   (saved for backward)
//   q, o [B,T,H,P]; k, v [B,T,Hk,P]; seq_idx [B,T] i32; lse [B,H,T].
// Backward (=): with p_ts = exp(s_ts - lse_t), D_t = do_t . o_t, ds_ts = p_ts (do_t . v_s - D_t):
//   dq_t = scale sum_s ds_ts k_s;  dk_s = scale sum_t ds_ts q_t;  dv_s = sum_t p_ts do_t
// The reference works one query row at a time (flash-style, no T x T matrix) and sums dk/dv over
// the query heads of a group in a fixed order.
// CPU tensors (f32, f64, one dtype) run the reference. GPU tensors run the CUDA kernels
// (attention_fwd.cu, attention_bwd.cu): q, k, v, o, dout, dq, dk, dv bf16 (or all f32: the
// simple f32 kernels of attention_f32.cu, for f32 runs), lse f32, P in {64, 128}, seq_idx
// non-decreasing along T (documents are contiguous runs, as the packer writes them); the backward
// needs a f32 workspace of attention_gpu_workspace_elems() elements.
#pragma once

#include "runtime/tensor.h"

namespace braid {

// Query rows [begin[i], end[i]) (i = 0, 1; empty ranges allowed): a part of the rows to compute.
struct AttentionRows {
  int64_t begin[2] = {0, 0}, end[2] = {0, 0};
  bool has(int64_t t) const {
    return (t >= begin[0] && t < end[0]) || (t >= begin[1] && t < end[1]);
  }
};

struct AttentionInputs {
  const Tensor* q = nullptr;
  const Tensor* k = nullptr;
  const Tensor* v = nullptr;
  const Tensor* seq_idx = nullptr;  // optional
  double scale = 0;                 // softmax scale, usually 1/sqrt(P)
  // Optional (null: every row): only these query rows. The forward leaves the other rows of o and
  // lse as they are; the backward writes dq = 0 there and sums dk, dv over these rows' queries.
  const AttentionRows* rows = nullptr;
  // GPU only.
  const Tensor* workspace = nullptr;  // backward: f32, attention_gpu_workspace_elems()
  bool deterministic = true;          // backward: dq summed in a fixed order (else f32 atomics)
  bool hopper = true;  // forward: the warp-specialised TMA + wgmma kernel on sm_90 (false: sm_80)
  void* stream = nullptr;  // CUDA stream (null: the default stream)
};

int64_t attention_gpu_workspace_elems(const AttentionInputs& in);

void attention_forward(const AttentionInputs& in, const Tensor& o, const Tensor& lse);
void attention_backward(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                        const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv);

}  // namespace braid
