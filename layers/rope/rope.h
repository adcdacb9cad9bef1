// Rotary position embedding, rotate-half convention (HF LlamaRotaryEmbedding /
// apply_rotary_pos_emb): for i < P/2, angle = pos * theta^(-2i/P):
//   y[i]       = x[i] cos - x[i+P/2] sin
//   y[i+P/2]   = x[i+P/2] cos + x[i] sin
//   x, y [B,T,H,P] (y may alias x), positions [B,T] i32 (position inside the document).
// Backward (=) is the inverse rotation: dx = R(-angle) dy (dx may alias dy).
#pragma once

#include "runtime/tensor.h"

namespace braid {

void rope_forward(const Tensor& x, const Tensor& positions, double theta, const Tensor& y);
void rope_backward(const Tensor& dy, const Tensor& positions, double theta, const Tensor& dx);

}  // namespace braid
