// Mamba-1 mixer (HF MambaMixer; JambaMambaMixer with dt_bc_norm):
//   [xs | z] = in_proj(x)                           xs, z [M,C], C = expand * D
//   xc       = silu(conv1d(xs))                     causal depthwise, width W, with bias
//   [dtr | Bp | Cp] = x_proj(xc)                    dtr [M,R], Bp, Cp [M,G*N]
//   (Jamba: dtr, Bp, Cp each RMS-normalised: dt_layernorm, b_layernorm, c_layernorm)
//   delta    = dt_proj.weight dtr                   [M,C]; dt_proj.bias enters the scan
//   y        = selective_scan(xc, delta, A = -exp(A_log), Bp, Cp, D, z, dt_proj.bias, softplus)
//   out      = out_proj(y)
// Parameters (HF names and shapes, conv1d.weight stored [C,W] for HF's [C,1,W]):
//   in_proj.weight [2C,D], conv1d.weight [C,W], conv1d.bias [C], x_proj.weight [R+2GN,C],
//   dt_proj.weight [C,R], dt_proj.bias [C], A_log [C,N], D [C], out_proj.weight [D,C].
// Tensor parallel over tp ranks (tp divides C; one group): each rank holds C/tp channels: its
// part of both halves of in_proj, of conv1d, dt_proj, A_log and D, and the matching columns of
// x_proj and out_proj (row-parallel). The x_proj reduction is explicit: [dtr | Bp | Cp] is summed
// over the group in forward (every rank then holds it whole), and its gradient in backward
// (before the Jamba norms, whose weights stay replicated); y summed, and dx in backward.
#pragma once

#include "layers/blocks/block.h"
#include "layers/selective_scan/selective_scan.h"

namespace braid {

struct Mamba1Config {
  int64_t d_model = 0;
  int64_t d_inner = 0;   // C
  int64_t d_state = 16;  // N
  int64_t dt_rank = 0;   // R
  int64_t d_conv = 4;    // W
  int64_t groups = 1;    // G (B and C shared by C/G channels each)
  bool dt_bc_norm = false;
  double norm_eps = 1e-6;
  double dt_min = 0.001, dt_max = 0.1;
};

class Mamba1Mixer final : public Block {
 public:
  // context_parallel: forwards run with a cp group (BatchMeta::cp); the mixer then saves the
  // state entering its shard.
  Mamba1Mixer(const Mamba1Config& cfg, ParamSet& ps, const std::string& prefix, double init_std,
              double out_std, const TensorParallel& tp = {}, bool context_parallel = false);
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  double flops_per_token(int64_t seq) const override;

 private:
  ScanInputs scan_inputs(const BatchMeta& meta) const;

  Mamba1Config global_;  // the whole mixer (FLOPs)
  Mamba1Config cfg_;     // this rank's part: d_inner / tp
  TensorParallel tp_;
  bool context_parallel_;
  int64_t b_ = 0, t_ = 0;
  Param *in_proj_, *conv_w_, *conv_b_, *x_proj_, *dt_w_, *dt_b_, *a_log_, *d_, *out_proj_;
  Param *dt_norm_ = nullptr, *b_norm_ = nullptr, *c_norm_ = nullptr;
  // saved
  Tensor xs_, z_, xc_, dtr_, bp_, cp_, dtn_, bn_, cn_, rs_dt_, rs_b_, rs_c_, delta_, a_, y_;
  Tensor xc3_, delta3_, z3_, b4_, c4_;  // [B,T,C] and [B,T,G,N] views for the scan
  // scratch
  Tensor dy_in_, dxc_, ddelta_, dz_, dbn_, dcn_, da_, ddtn_, ddtr_, dbp_, dcp_, dxs_, conv_ws_,
      norm_ws_;
  Tensor ws_;             // the scan's workspace (saved on the GPU, scratch on the CPU)
  Tensor scan_scratch_;   // the scan backward's scratch (GPU only)
  Tensor entering_;       // saved under context parallelism: the state entering the shard [B,C,N]
  Tensor conv_entering_;  // ... and the conv's initial state [B,C,W-1]
};

}  // namespace braid
