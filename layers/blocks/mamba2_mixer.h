// Mamba-2 mixer (HF Mamba2Mixer / NemotronHMamba2Mixer):
//   [z | xs | Bs | Cs | dtr] = in_proj(x)            z, xs [M,C]; Bs, Cs [M,G*N]; dtr [M,H]
//   xc, Bc, Cc = silu(conv1d([xs | Bs | Cs]))         one depthwise conv over C + 2GN channels
//   y   = ssd(xc as [B,T,H,P], dtr, A = -exp(A_log), Bc, Cc, D, dt_bias, softplus, dt limits)
//   g   = gated_rmsnorm(y, z, norm.weight, groups G) (gate first, then grouped RMS norm)
//   out = out_proj(g)
// Parameters (HF names): in_proj.weight [2C+2GN+H, D], conv1d.weight [C+2GN, W] (HF [.,1,W]),
// conv1d.bias [C+2GN], dt_bias [H], A_log [H], D [H], norm.weight [C], out_proj.weight [D,C];
// C = H * P.
// Tensor parallel over tp ranks (tp divides H and G): each rank holds H/tp heads and the G/tp
// groups they read: its part of every segment of in_proj, conv1d and norm, of dt_bias, A_log and
// D, and the matching columns of out_proj (row-parallel); y summed over the group, and dx in
// backward. The grouped norm stays local (a rank holds whole groups).
#pragma once

#include <limits>

#include "layers/blocks/block.h"
#include "layers/ssd/ssd.h"

namespace braid {

struct Mamba2Config {
  int64_t d_model = 0;
  int64_t heads = 0;      // H
  int64_t head_dim = 64;  // P
  int64_t groups = 1;     // G
  int64_t d_state = 128;  // N
  int64_t d_conv = 4;     // W
  int64_t chunk = 256;    // Q
  double norm_eps = 1e-5;
  double dt_min = 0.001, dt_max = 0.1;  // initialisation range of softplus(dt_bias)
  double dt_limit_min = 0.0, dt_limit_max = std::numeric_limits<double>::infinity();
  double a_init_min = 1.0, a_init_max = 16.0;
};

class Mamba2Mixer final : public Block {
 public:
  // context_parallel: forwards run with a cp group (BatchMeta::cp); the mixer then saves the
  // state entering its shard.
  Mamba2Mixer(const Mamba2Config& cfg, ParamSet& ps, const std::string& prefix, double init_std,
              double out_std, const TensorParallel& tp = {}, bool context_parallel = false);
  void plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) override;
  void forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) override;
  void backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                const BatchMeta& meta) override;
  double flops_per_token(int64_t seq) const override;

 private:
  int64_t inner() const { return cfg_.heads * cfg_.head_dim; }
  SsdInputs ssd_inputs(const BatchMeta& meta) const;
  void conv_forward(const Tensor& in, const Tensor& out, int64_t ch0, int64_t ch,
                    const BatchMeta& meta);
  Tensor conv_entering(int64_t ch0, int64_t ch) const;  // [B, ch, W-1] of conv_entering_

  Mamba2Config global_;  // the whole mixer (FLOPs)
  Mamba2Config cfg_;     // this rank's part: heads / tp, groups / tp
  TensorParallel tp_;
  bool context_parallel_;
  int64_t b_ = 0, t_ = 0;
  Param *in_proj_, *conv_w_, *conv_b_, *dt_bias_, *a_log_, *d_, *norm_, *out_proj_;
  Tensor z_, xs_, bs_, cs_, dtr_, xc_, bc_, cc_, a_, y_, rstd_, g_;  // saved
  Tensor y_scan_;    // saved on GPUs in bf16: the SSD's y - D x [B,T,H,P] (ssd.h), else empty
  Tensor entering_;  // saved under context parallelism: the state entering the shard [B,H,P,N]
  // saved under context parallelism: the conv's initial state of each part (x, B, C), each
  // [B, part channels, W-1], one after the other
  Tensor conv_entering_;
  Tensor x4_, dt3_, b4_, c4_;  // [B,T,H,P], [B,T,H], [B,T,G,N] views of xc_, dtr_, bc_, cc_
  Tensor dg_, dy_, dz_, dxc_, dbc_, dcc_, ddt_, da_, dxs_, dbs_, dcs_, ws_, fws_,
      ssd_scratch_;  // scratch (fws_ and ws_ saved on the GPU; ssd_scratch_ only there)
  // scratch: ddt_c_ ddt in the activation dtype (ddt_ itself when that is the parameters'); the
  // conv and gated norm backwards' workspaces (empty on the CPU)
  Tensor ddt_c_, conv_ws_, norm_ws_;
};

}  // namespace braid
