// Causal depthwise conv1d (HF MambaMixer conv1d with padding W-1, channels last), optional SiLU:
//   pre[b,t,c] = bias[c] + sum_{k<W} w[c,k] * xin(b, t-W+1+k, c);   y = silu(pre) or pre
// where xin(b,s,c) is x[b,s,c] for s >= 0 and initial_state[b,c,W-1+s] for s < 0, and is 0 when
// position s belongs to another document than t (seq_idx differs; the initial state belongs to
// the document of token 0). final_state[b,c,j] = xin(b, T-W+1+j, c), 0 where that position is in
// another document than token T-1, so that running [0,T1) then [T1,T) with the state passed
// equals one run over [0,T).
//   x [B,T,C], w [C,W] (HF stores [C,1,W]), bias [C], seq_idx [B,T] i32 (non-decreasing per row),
//   initial_state / final_state [B,C,W-1], W in 2..4.
// Backward: dx (=), dinitial_state (=), dw (+=), dbias (+=); dfinal_state (optional input) is the
// gradient arriving at final_state. CPU tensors (f32, f64) run the reference; GPU tensors (f32 or
// bf16, all of one dtype, but dw and dbias may be f32 with bf16 tensors) run the CUDA kernels,
// whose backward needs an f32 workspace of
// causal_conv1d_workspace_elems elements for its deterministic dw/dbias partial sums.
#pragma once

#include "runtime/tensor.h"

namespace braid {

struct Conv1dInputs {
  const Tensor* x = nullptr;              // [B,T,C]
  const Tensor* w = nullptr;              // [C,W]
  const Tensor* bias = nullptr;           // [C] or null
  const Tensor* seq_idx = nullptr;        // [B,T] i32 or null (one document per row)
  const Tensor* initial_state = nullptr;  // [B,C,W-1] or null (zeros)
  bool silu = false;
  void* stream = nullptr;  // CUDA stream for GPU tensors (null: default stream)
};

void causal_conv1d_forward(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state);

struct Conv1dGrads {
  const Tensor* dx = nullptr;              // [B,T,C]   (=)
  const Tensor* dw = nullptr;              // [C,W]     (+=)
  const Tensor* dbias = nullptr;           // [C]       (+=), or null
  const Tensor* dinitial_state = nullptr;  // [B,C,W-1] (=), or null
};

int64_t causal_conv1d_workspace_elems(const Conv1dInputs& in);  // 0 on the CPU
void causal_conv1d_backward(const Conv1dInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                            const Conv1dGrads& grads, const Tensor* workspace = nullptr);

}  // namespace braid
