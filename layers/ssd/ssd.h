// Mamba-2 SSD (state space duality; mamba_ssm mamba_chunk_scan_combined / HF Mamba2Mixer), per
// batch b, head h of group g = h / (H/G), head channel p, state n:
//   dt_t    = clamp(softplus(dt_raw_t + dt_bias), dt_min, dt_max)   (softplus optional)
//   h_t     = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T                   h [P,N], h_{-1} =
//   initial_state y_t     = h_t C_t + D x_t
// A document boundary (seq_idx[t] != seq_idx[t-1]) sets h_{t-1} = 0; the initial state belongs to
// the document of token 0; final_state = h_{T-1}.
// The forward is the chunked algorithm (chunks of Q tokens: quadratic attention-like products
// inside a chunk, states passed between chunks); ssd_forward_quadratic computes the same function
// in the fully quadratic form (for tests).
//   x, y [B,T,H,P]; dt_raw [B,T,H]; A, dt_bias [H]; D [H] (per head) or [H,P] (per channel);
//   Bm, Cm [B,T,G,N]; seq_idx [B,T] i32; initial_state, final_state [B,H,P,N].
// Packed sequences: seq_idx numbers the documents of a row in order, non-decreasing along the row
// (as mamba_ssm's seq_idx; cu_seqlens of a packed batch become seq_idx[t] = index of the document
// holding token t); no state crosses from one document into the next.
// Backward (gradient convention): dx, ddt, dB, dC, dinitial_state (=); dA, dD, ddt_bias (+=);
// dfinal_state is the optional gradient arriving at final_state. Forward and backward take a
// workspace of ssd_forward_workspace_elems() / ssd_backward_workspace_elems() elements: on the CPU
// the backward recomputes and keeps every state there; on the GPU the forward leaves there what
// the backward reads (one workspace, a layer's own from its forward to its backward), and with
// bf16 rows every pass also takes a scratch of ssd_scratch_elems() elements, which all layers
// may share (SsdInputs::scratch).
#pragma once

#include <limits>

#include "runtime/tensor.h"

namespace braid {

struct SsdInputs {
  const Tensor* x = nullptr;
  const Tensor* dt = nullptr;
  const Tensor* A = nullptr;
  const Tensor* B = nullptr;
  const Tensor* C = nullptr;
  const Tensor* D = nullptr;              // optional
  const Tensor* dt_bias = nullptr;        // optional
  const Tensor* seq_idx = nullptr;        // optional
  const Tensor* initial_state = nullptr;  // optional (zeros)
  bool dt_softplus = true;
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
  int64_t chunk = 256;
  // Optional, GPU and bf16 only: y - D x [B,T,H,P], the scan's part of y. The forward writes it;
  // the backward then reads dy . (y - D x) from it instead of running the chunk scan again. (Not
  // from y itself: y - D x from the bf16 y cancels badly where D x dominates.)
  const Tensor* y_scan = nullptr;
  // GPU, bf16: the forward runs as one fused TMA + wgmma kernel on sm_90 (false: the chunked
  // kernels, as on sm_80).
  bool hopper = true;
  // GPU, bf16: f32 scratch of ssd_scratch_elems() elements that a pass fills and reads (nothing in
  // it outlives the call); null: taken from CUDA's stream-ordered pool on `stream`.
  const Tensor* scratch = nullptr;
  void* stream = nullptr;  // CUDA stream for GPU tensors (null: default stream)
};

struct SsdGrads {
  const Tensor* dx = nullptr;
  const Tensor* ddt = nullptr;
  const Tensor* dA = nullptr;
  const Tensor* dB = nullptr;
  const Tensor* dC = nullptr;
  const Tensor* dD = nullptr;              // needed when D is given
  const Tensor* ddt_bias = nullptr;        // needed when dt_bias is given
  const Tensor* dinitial_state = nullptr;  // optional
};

struct SsdDims {
  int64_t b, t, h, p, g, n;
};
// Every shape checked (not dtypes or devices).
SsdDims ssd_dims(const SsdInputs& in);
void check_ssd_grads(const SsdInputs& in, const SsdDims& d, const Tensor& dy,
                     const Tensor* dfinal_state, const SsdGrads& grads);

int64_t ssd_forward_workspace_elems(const SsdInputs& in);
int64_t ssd_backward_workspace_elems(const SsdInputs& in);
int64_t ssd_scratch_elems(const SsdInputs& in);  // 0 where no pass takes one
void ssd_forward(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                 const Tensor& workspace);
void ssd_forward_quadratic(const SsdInputs& in, const Tensor& y, const Tensor* final_state);
void ssd_backward(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                  const SsdGrads& grads, const Tensor& workspace);
// The initial state's gradient alone: what ssd_backward writes to dinitial_state (=). On GPUs
// with bf16 rows it is the chunked kernels' state-gradient pass over what the forward saved in
// `workspace` (a fraction of the backward); elsewhere the whole backward, its other gradients
// into scratch (workspace: the backward's, as ssd_backward's). Context parallelism's first
// backward pass (ssd_cp.h).
void ssd_initial_state_grad(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                            const Tensor& dinitial_state, const Tensor& workspace);

}  // namespace braid
