// The CUDA contract of SSD: one Params struct (pointers, sizes), built and validated on the host
// by ssd.cpp, and the layout of the f32 workspace that the forward fills and the backward reads.
// x, B, C, y, dx, dB, dC are bf16 ([B,T,H,P] and [B,T,G,N] rows); dt, A, D, dt_bias, the states
// and every other gradient f32; seq_idx i32. The kernels and their algorithm are described in
// ssd_fwd.cu and ssd_bwd.cu.
//
// Per chunk c of Q tokens (the last one padded to Q), head h of group g, with a_i the cumulative
// sum of dt A over the chunk up to token i and L the chunk's last token:
//   S_c    = the state entering chunk c (S_0 = initial_state), [P,N]
//   S_c+1  = keep_c S_c + sum_j [doc_j = doc_L] e^(a_L - a_j) dt_j x_j B_j^T,
//            keep_c = [doc_L = doc of S_c] e^(a_L)
//   y_i    = D x_i + [doc_i = doc of S_c] e^(a_i) S_c C_i
//            + sum_{j <= i, doc_j = doc_i} (C_i . B_j) e^(a_i - a_j) dt_j x_j
#pragma once

#include <cstdint>

#include "runtime/philox.h"  // BRAID_HD
#include "runtime/tensor.h"

namespace braid {

constexpr int kSsdBlock = 64;  // tokens per tile: the chunk size Q is a multiple of it

// Sizes derived from (B, T, H, P, G, N, Q) that the kernels and their memory share; offsets are in
// f32 elements (bf16 arrays take half a slot per element): of the workspace for what the forward
// saves for the backward, of the scratch for what one pass fills and reads (the scratch can be
// shared by every layer; the workspace is a layer's own from its forward to its backward).
struct SsdGeometry {
  int64_t chunks = 0;           // nc = ceil(T / Q)
  int64_t tpad = 0;             // nc Q
  int64_t splits = 0;           // the heads of a group are summed into dB and dC in this many
  int64_t heads_per_split = 0;  // parts of this many heads (then the parts in a fixed order)
  int64_t pass_blocks = 0;      // thread blocks over the P N elements of a state (P N / 1024)
  int64_t d_cols = 0;           // 1 (D per head) or P (D per channel)
  // Saved by the forward for the backward (offsets in the workspace):
  int64_t dt = 0;      // dt after softplus and clamp, [B,H,Tpad]
  int64_t acs = 0;     // a_i, the chunk's cumulative dt A, [B,H,Tpad]
  int64_t states = 0;  // S_c, bf16 [B,nc,H,P,N]
  int64_t last = 0;    // the state after the last chunk (f32 final state), [B,H,P,N]
  int64_t docs = 0;    // the document of each token (i32; the padding repeats the last), [B,Tpad]
  // Scratch (offsets in the scratch):
  int64_t scores = 0;   // Hopper forward: C_i . B_j within each 64-token tile, bf16 in the order
                        // of the y warpgroup's A fragments, [B,Tpad/64,G,64,64]
  int64_t local = 0;    // forward: the chunk's own state term; backward: its state gradient
  int64_t dstates = 0;  // backward: the gradient of S_c+1, bf16 [B,nc,H,P,N]
  int64_t r = 0;        // dy_i . (y_i - D x_i), [P/64 parts][B,H,Tpad]
  int64_t delta = 0;    // x_i . (dx_i - D dy_i) / dt_i, [P/64 parts][B,H,Tpad]
  int64_t kappa = 0;    // <dS_c+1, S_c+1> partial sums, [B,H,nc,pass_blocks]
  int64_t dbc = 0;      // dB then dC partial sums, f32 [2][splits,B,Tpad,G,N]
  int64_t part_a = 0, part_bias = 0;  // dA and ddt_bias partial sums, [B,nc,H]
  int64_t part_d = 0;  // dD partial sums, [B,Tpad/64,H,d_cols] (SsdParams::d_whole: [B,H,P])
  int64_t workspace_elems = 0, scratch_elems = 0;
};
SsdGeometry ssd_geometry(int64_t b, int64_t t, int64_t h, int64_t p, int64_t g, int64_t n,
                         int64_t q, bool d_per_channel);

struct SsdParams {
  int batch = 0, seqlen = 0, heads = 0, head_dim = 0, groups = 1, d_state = 0, chunk = 0;
  bool dt_softplus = true;
  float dt_min = 0.f, dt_max = 0.f;
  bool d_per_channel = false;
  bool hopper = true;  // the fused TMA + wgmma kernels on sm_90 (ssd_*_hopper.cu)
  // Set by the backward for its reductions (which kernels wrote the partial sums): r and delta
  // are summed over this many parts, kappa over this many partial sums per chunk, and the dD
  // partial sums are one per (batch row, head) with P columns (d_whole) or one per 64-token tile
  // with d_cols.
  int r_parts = 1, delta_parts = 1, kappa_parts = 1;
  bool d_whole = false;
  SsdGeometry geo;
  // Forward inputs and outputs.
  const void *x = nullptr, *B = nullptr, *C = nullptr;
  const float *dt = nullptr, *A = nullptr, *D = nullptr, *dt_bias = nullptr;
  const int32_t* seq_idx = nullptr;      // [B,T]
  const float* initial_state = nullptr;  // [B,H,P,N]
  void* y = nullptr;
  void* y_scan = nullptr;        // y - D x (optional): the forward writes it, the backward reads it
  float* final_state = nullptr;  // [B,H,P,N]
  float* ws = nullptr;           // the workspace (geo.workspace_elems)
  float* scratch = nullptr;      // the scratch (geo.scratch_elems)
  // Backward: dy in; dx, ddt, dB, dC, dinitial_state (=); dA, dD, ddt_bias (+=).
  const void* dy = nullptr;
  const float* dfinal_state = nullptr;
  void *dx = nullptr, *dB = nullptr, *dC = nullptr;
  float *ddt = nullptr, *dA = nullptr, *dD = nullptr, *ddt_bias = nullptr;
  float* dinitial_state = nullptr;
};

// Launch on `stream` (a cudaStream_t; null for the default stream).
void ssd_fwd_cuda(const SsdParams& p, void* stream);
// dinitial_state alone (bf16 rows): the chunks' state gradients and their reverse pass, from the
// forward's workspace (dt, decays, documents, chunk states).
void ssd_state_grad_cuda(const SsdParams& p, void* stream);
void ssd_bwd_cuda(const SsdParams& p, void* stream);
// The f32 path (ssd_f32.cu: x, B, C, y, dy, dx, dB, dC f32 too; geo unused): the recurrence step
// by step, for f32 runs. Its workspace (f32 elements): the states entering each segment of
// kSsdF32Seg tokens [B,H,nseg,P,N], one segment's states [B,H,kSsdF32Seg,P,N], dB and dC per
// head [B,T,H,N] each, dA and ddt_bias partial sums [B,H] each, dD partial sums [B,H,P].
constexpr int kSsdF32Seg = 64;
struct SsdF32Layout {
  int64_t nseg = 0, ckpt = 0, seg = 0, dbh = 0, dch = 0, pa = 0, pbias = 0, pd = 0, total = 0;
};
BRAID_HD SsdF32Layout ssd_f32_layout(int64_t b, int64_t t, int64_t h, int64_t p, int64_t n) {
  SsdF32Layout s;
  s.nseg = (t + kSsdF32Seg - 1) / kSsdF32Seg;
  s.ckpt = 0;
  s.seg = s.ckpt + b * h * s.nseg * p * n;
  s.dbh = s.seg + b * h * kSsdF32Seg * p * n;
  s.dch = s.dbh + b * t * h * n;
  s.pa = s.dch + b * t * h * n;
  s.pbias = s.pa + b * h;
  s.pd = s.pbias + b * h;
  s.total = s.pd + b * h * p;
  return s;
}
void ssd_fwd_f32_cuda(const SsdParams& p, void* stream);
void ssd_bwd_f32_cuda(const SsdParams& p, void* stream);

struct SsdInputs;
struct SsdGrads;
// Validate GPU tensors, build the Params and launch (ssd.cpp).
int64_t ssd_gpu_workspace_elems(const SsdInputs& in);
int64_t ssd_gpu_scratch_elems(const SsdInputs& in);
void ssd_forward_gpu(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                     const Tensor& workspace);
void ssd_backward_gpu(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                      const SsdGrads& grads, const Tensor& workspace);

}  // namespace braid
