// Shape checks shared by the CPU and GPU paths, and the GPU entry points (causal_conv1d.cpp).
#pragma once

#include "layers/causal_conv1d/causal_conv1d.h"
#include "layers/causal_conv1d/causal_conv1d_cuda.h"

namespace braid {

struct ConvDims {
  int64_t b, t, c, w;
};
ConvDims causal_conv1d_dims(const Conv1dInputs& in);  // every shape and dtype, not devices

void causal_conv1d_forward_gpu(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state);
void causal_conv1d_backward_gpu(const Conv1dInputs& in, const Tensor& dy,
                                const Tensor* dfinal_state, const Conv1dGrads& grads,
                                const Tensor* workspace);

}  // namespace braid
