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

// Context parallelism's halo (causal_conv1d_cp.h) of x or dx [B,T,C] (f32 or bf16) with
// h = W - 1: halo [B,C,h] = the last h inputs of each row that are in the document of its last
// token (others 0), and the reverse, halo added onto dx at those positions.
struct ConvHalo {
  int batch = 0, seqlen = 0, channels = 0, halo = 0;
  bool bf16 = false;
  const int32_t* seq_idx = nullptr;
};
void causal_conv1d_halo_cuda(const ConvHalo& p, bool add, void* x_or_dx, void* halo, void* stream);

}  // namespace braid
