// SwiGLU activation (HF LlamaMLP's act_fn(gate) * up with act_fn = SiLU):
//   y = silu(a) * b;   a, b, y [M,F].
//   da = dy * b * silu'(a)   (=)      db = dy * silu(a)   (=)
#pragma once

#include "runtime/tensor.h"

namespace braid {

void swiglu_forward(const Tensor& a, const Tensor& b, const Tensor& y);
void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dy, const Tensor& da,
                     const Tensor& db);

}  // namespace braid
