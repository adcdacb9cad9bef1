// The CUDA contract of the causal conv1d: one Params struct, built and validated on the host by
// causal_conv1d.cpp. x, w, bias, the states, y and every gradient share one dtype (f32 or bf16,
// as the CPU reference), except that dw and dbias may be f32 with bf16 tensors (mixed precision
// keeps f32 gradients); accumulation is f32; seq_idx is i32.
//
// Work split: a block owns one 128-byte line of channels (64 bf16 or 32 f32) of one batch row and
// kConvTile steps. It stages its input rows (with the W - 1 steps before them, and in the backward
// the W - 1 outputs after them) in shared memory, computes there, and writes back whole lines. The
// backward leaves its dw and dbias sums in a per-(batch row, tile) partial that a finishing kernel
// adds in a fixed order.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

constexpr int kConvTile = 64;  // steps per block (and dw partial granularity)

struct Conv1dParams {
  int batch = 0, seqlen = 0, channels = 0, width = 0;
  bool bf16 = false, silu = false;
  bool f32_grads = false;  // dw and dbias are f32 (with bf16 tensors: mixed precision)
  const void *x = nullptr, *w = nullptr, *bias = nullptr, *initial_state = nullptr;
  const int32_t* seq_idx = nullptr;
  void *y = nullptr, *final_state = nullptr;
  // Backward: dy in; dx, dinitial_state (=); dw, dbias (+=).
  const void *dy = nullptr, *dfinal_state = nullptr;
  void *dx = nullptr, *dw = nullptr, *dbias = nullptr, *dinitial_state = nullptr;
  float* partial = nullptr;  // [B * ceil(T / kConvTile), C, W + 1] f32 scratch
};

inline int64_t conv1d_partial_elems(int64_t b, int64_t t, int64_t c, int64_t w) {
  return b * ((t + kConvTile - 1) / kConvTile) * c * (w + 1);
}

void causal_conv1d_fwd_cuda(const Conv1dParams& p, void* stream);
void causal_conv1d_bwd_cuda(const Conv1dParams& p, void* stream);

}  // namespace braid
