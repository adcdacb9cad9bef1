// Rotary position embedding, rotate-half convention (HF LlamaRotaryEmbedding /
// apply_rotary_pos_emb): for i < P/2, angle = pos * theta^(-2i/P):
//   y[i]       = x[i] cos - x[i+P/2] sin
//   y[i+P/2]   = x[i+P/2] cos + x[i] sin
//   x, y [B,T,H,P] (y may alias x), positions [B,T] i32 (position inside the document).
// Backward (=) is the inverse rotation: dx = R(-angle) dy (dx may alias dy).
// CPU tensors (f32, f64) run the reference; GPU tensors (bf16 or f32, P a multiple of 4) the CUDA
// kernel (rope_kernels.cu: angles in f64, rotation in f32) on `stream` (null: default stream).
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

void rope_forward(const Tensor& x, const Tensor& positions, double theta, const Tensor& y,
                  void* stream = nullptr);
void rope_backward(const Tensor& dy, const Tensor& positions, double theta, const Tensor& dx,
                   void* stream = nullptr);

// The CUDA side: sizes checked by the caller; x, y [tokens, heads, p] (y may alias x).
void rope_cuda(const void* x, void* y, const int32_t* positions, int64_t tokens, int64_t heads,
               int64_t p, double theta, bool bf16, bool inverse, void* stream);

}  // namespace braid
