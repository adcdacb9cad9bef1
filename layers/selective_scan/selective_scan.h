// Mamba-1 selective scan (mamba_ssm selective_scan_fn / HF MambaMixer), per batch b, channel c of
// group g = c / (C/G), state n:
//   dt_t   = softplus(delta_t + delta_bias)   (or delta_t + delta_bias without softplus)
//   h_t,n  = exp(dt_t A_n) h_{t-1},n + dt_t B_t,g,n u_t         (h_{-1} = initial_state)
//   y_t    = (sum_n C_t,g,n h_t,n + D u_t) * silu(z_t)          (z optional)
// A document boundary (seq_idx[t] != seq_idx[t-1]) sets h_{t-1} = 0; the initial state belongs to
// the document of token 0, final_state = h_{T-1}. Running [0,T1) then [T1,T) with the state
// passed equals one run over [0,T).
//   u, delta, z, y [B,T,C]; A [C,N] (real, negative: A = -exp(A_log)); Bm, Cm [B,T,G,N];
//   D, delta_bias [C]; seq_idx [B,T] i32; initial_state, final_state [B,C,N].
// Backward (gradient convention): du, ddelta, dz, dB, dC, dinitial_state (=); dA, dD,
// ddelta_bias (+=). dfinal_state is the optional gradient arriving at final_state.
// Workspace (selective_scan_workspace_elems elements): on the CPU, scratch of the activation
// dtype for the backward (the states of every step); on the GPU, f32, and the forward must be
// given it: it saves the state entering every 128-step chunk there, which the backward reads.
// The GPU backward also takes an f32 scratch for its deterministic partial sums
// (selective_scan_scratch_elems; ScanInputs::scratch), which all layers may share.
#pragma once

#include "runtime/tensor.h"

namespace braid {

struct ScanInputs {
  const Tensor* u = nullptr;
  const Tensor* delta = nullptr;
  const Tensor* A = nullptr;
  const Tensor* B = nullptr;
  const Tensor* C = nullptr;
  const Tensor* D = nullptr;              // optional
  const Tensor* z = nullptr;              // optional
  const Tensor* delta_bias = nullptr;     // optional
  const Tensor* seq_idx = nullptr;        // optional
  const Tensor* initial_state = nullptr;  // optional (zeros)
  bool delta_softplus = true;
  // GPU forward tuning: threads per channel, 4 or 8 for d_state <= 16 (fixed above); 0 picks by
  // size (the benchmark and the tests set it to cover every variant).
  int fwd_lanes = 0;
  // GPU: the backward's f32 scratch of selective_scan_scratch_elems() elements (nothing in it
  // outlives the call); null: taken from CUDA's stream-ordered pool on `stream`.
  const Tensor* scratch = nullptr;
  void* stream = nullptr;  // CUDA stream for GPU tensors (null: default stream)
};

struct ScanGrads {
  const Tensor* du = nullptr;
  const Tensor* ddelta = nullptr;
  const Tensor* dA = nullptr;
  const Tensor* dB = nullptr;
  const Tensor* dC = nullptr;
  const Tensor* dD = nullptr;              // needed when D is given
  const Tensor* dz = nullptr;              // needed when z is given
  const Tensor* ddelta_bias = nullptr;     // needed when delta_bias is given
  const Tensor* dinitial_state = nullptr;  // optional
};

// Sizes of a scan, after checking every shape (not dtypes or devices).
struct ScanDims {
  int64_t b, t, c, n, g;
};
ScanDims selective_scan_dims(const ScanInputs& in);
// The backward's required gradients and every gradient's shape (shared by both devices).
void check_scan_grads(const ScanInputs& in, const ScanDims& d, const Tensor& dy,
                      const Tensor* dfinal_state, const ScanGrads& grads);

// CPU tensors (f32, f64) run the reference; GPU tensors run the CUDA kernels, with u, delta, z,
// B, C, y and their gradients in bf16 or f32 and A, D, delta_bias, the states, dA, dD and
// ddelta_bias in f32.
void selective_scan_forward(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                            const Tensor* workspace = nullptr);
int64_t selective_scan_workspace_elems(const ScanInputs& in);
int64_t selective_scan_scratch_elems(const ScanInputs& in);  // 0 on the CPU
void selective_scan_backward(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                             const ScanGrads& grads, const Tensor& workspace);

}  // namespace braid
