// The CUDA contract of the selective scan: one Params struct (pointers, sizes), built and
// validated on the host by selective_scan.cpp. Activations (u, delta, z, B, C, y and their
// gradients) are f32 or bf16 with channels contiguous ([B,T,C] and [B,T,G,N] rows); A, D,
// delta_bias, the states and dA, dD, ddelta_bias are f32; seq_idx is i32.
//
// The backward's block owns kScanChannels consecutive channels of one group and one batch row
// and walks the sequence in reverse in chunks of kScanChunk steps, each started from the state
// the forward saved at its start (the forward's own layout is in selective_scan_fwd.cu).
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace braid {

constexpr int kScanChunk = 128;    // steps per chunk
constexpr int kScanChannels = 16;  // channels per block

// Sizes derived from (B, T, C, N, G) that the kernels and the workspace share.
struct ScanGeometry {
  int64_t chunks;            // K = ceil(T / kScanChunk)
  int64_t blocks_per_group;  // P = ceil((C / G) / kScanChannels)
  // f32 workspace (the forward's, saved for the backward): chunk states [B,K,C,N]. f32 scratch
  // (the backward's): dB/dC partial sums [2,B,G*P,N,K*kScanChunk], dA partials [B,C,N], dD and
  // ddelta_bias partials [2,B,C].
  int64_t states_elems, partial_bc_elems, partial_a_elems, partial_d_elems;
  int64_t workspace_elems() const { return states_elems; }
  int64_t scratch_elems() const { return partial_bc_elems + partial_a_elems + partial_d_elems; }
};
inline ScanGeometry scan_geometry(int64_t b, int64_t t, int64_t c, int64_t n, int64_t g) {
  ScanGeometry s{};
  s.chunks = (t + kScanChunk - 1) / kScanChunk;
  s.blocks_per_group = (c / g + kScanChannels - 1) / kScanChannels;
  s.states_elems = b * s.chunks * c * n;
  s.partial_bc_elems = 2 * b * g * s.blocks_per_group * n * s.chunks * kScanChunk;
  s.partial_a_elems = b * c * n;
  s.partial_d_elems = 2 * b * c;
  return s;
}

struct ScanParams {
  int batch = 0, seqlen = 0, channels = 0, d_state = 0, groups = 1;
  bool bf16 = false;  // activation dtype: bf16 (else f32)
  bool delta_softplus = true;
  bool stage_async = false;  // set by the forward's launcher: stage chunks with cp.async
  int fwd_lanes = 0;         // forward threads per channel (ScanInputs::fwd_lanes)
  // Forward inputs and output.
  const void *u = nullptr, *delta = nullptr, *z = nullptr, *B = nullptr, *C = nullptr;
  void* y = nullptr;
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr;
  const int32_t* seq_idx = nullptr;      // [B,T]
  const float* initial_state = nullptr;  // [B,C,N]
  float* final_state = nullptr;          // [B,C,N]
  float* chunk_states = nullptr;         // [B,K,C,N]: forward writes it when set, backward reads
  // Backward: dy in; du, ddelta, dz, dB, dC (=), dA, dD, ddelta_bias (+=), dinitial_state (=).
  const void* dy = nullptr;
  void *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dB = nullptr, *dC = nullptr;
  float *dA = nullptr, *dD = nullptr, *ddelta_bias = nullptr, *dinitial_state = nullptr;
  const float* dfinal_state = nullptr;
  float *partial_bc = nullptr, *partial_a = nullptr, *partial_d = nullptr;  // workspace scratch
};

// Launch on `stream` (a cudaStream_t; null for the default stream).
void selective_scan_fwd_cuda(const ScanParams& p, void* stream);
void selective_scan_bwd_cuda(const ScanParams& p, void* stream);

struct ScanInputs;
struct ScanGrads;
// Validate GPU tensors, build the Params and launch (selective_scan.cpp).
void selective_scan_forward_gpu(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                                const Tensor* workspace);
void selective_scan_backward_gpu(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                 const ScanGrads& grads, const Tensor& workspace);

}  // namespace braid
