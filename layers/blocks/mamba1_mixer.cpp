#include "layers/blocks/mamba1_mixer.h"

#include <algorithm>
#include <cmath>

#include "layers/causal_conv1d/causal_conv1d.h"
#include "layers/causal_conv1d/causal_conv1d_cp.h"
#include "layers/elementwise/elementwise.h"
#include "layers/linear/linear.h"
#include "layers/rmsnorm/rmsnorm.h"
#include "layers/selective_scan/selective_scan.h"
#include "layers/selective_scan/selective_scan_cp.h"

namespace braid {

namespace {
Mamba1Config local_part(Mamba1Config c, const TensorParallel& tp) {
  BRAID_CHECK(c.d_inner % tp.size() == 0 && (tp.size() == 1 || c.groups == 1),
              "mamba1: tp = ", tp.size(), " must divide d_inner = ", c.d_inner,
              " (and tensor parallelism needs groups = 1; got ", c.groups, ")");
  c.d_inner /= tp.size();
  return c;
}
}  // namespace

Mamba1Mixer::Mamba1Mixer(const Mamba1Config& cfg, ParamSet& ps, const std::string& p,
                         double init_std, double out_std, const TensorParallel& tp,
                         bool context_parallel)
    : global_(cfg), cfg_(local_part(cfg, tp)), tp_(tp), context_parallel_(context_parallel) {
  // Registered in logical (whole-mixer) sizes; the shards hold this rank's channels.
  const int64_t d = cfg.d_model, c = cfg.d_inner, n = cfg.d_state, r = cfg.dt_rank, g = cfg.groups;
  const double conv_bound = 1.0 / std::sqrt(double(cfg.d_conv));  // PyTorch Conv1d default
  const ParamShard rows = tp.shard(0), cols = tp.shard(1);
  const ParamShard halves =
      tp.size() > 1 ? ParamShard{0, tp.size(), tp.rank(), {c, c}} : ParamShard{};
  in_proj_ = ps.add(pname(p, "in_proj.weight"), {2 * c, d}, {ParamInit::Kind::normal, init_std},
                    true, true, halves);
  conv_w_ = ps.add(pname(p, "conv1d.weight"), {c, cfg.d_conv},
                   {ParamInit::Kind::uniform, -conv_bound, conv_bound}, true, true, rows);
  conv_b_ = ps.add(pname(p, "conv1d.bias"), {c},
                   {ParamInit::Kind::uniform, -conv_bound, conv_bound}, false, true, rows);
  x_proj_ = ps.add(pname(p, "x_proj.weight"), {r + 2 * g * n, c},
                   {ParamInit::Kind::normal, init_std}, true, true, cols);
  const double dt_std = 1.0 / std::sqrt(double(r));  // HF: dt_init_std = dt_rank^-0.5 * dt_scale
  dt_w_ = ps.add(pname(p, "dt_proj.weight"), {c, r}, {ParamInit::Kind::uniform, -dt_std, dt_std},
                 true, true, rows);
  dt_b_ = ps.add(pname(p, "dt_proj.bias"), {c}, {ParamInit::Kind::dt_bias, cfg.dt_min, cfg.dt_max},
                 false, true, rows);
  a_log_ = ps.add(pname(p, "A_log"), {c, n}, {ParamInit::Kind::log_arange}, false, true, rows);
  d_ = ps.add(pname(p, "D"), {c}, {ParamInit::Kind::constant, 1.0}, false, true, rows);
  out_proj_ = ps.add(pname(p, "out_proj.weight"), {d, c}, {ParamInit::Kind::normal, out_std}, true,
                     true, cols);
  if (cfg.dt_bc_norm) {
    dt_norm_ =
        ps.add(pname(p, "dt_layernorm.weight"), {r}, {ParamInit::Kind::constant, 1.0}, false);
    b_norm_ = ps.add(pname(p, "b_layernorm.weight"), {n}, {ParamInit::Kind::constant, 1.0}, false);
    c_norm_ = ps.add(pname(p, "c_layernorm.weight"), {n}, {ParamInit::Kind::constant, 1.0}, false);
  }
  conv_b_->cast = true;  // the conv reads its bias in the activation dtype
}

void Mamba1Mixer::plan(Arena& sv, Arena& sc, int64_t batch, int64_t seq) {
  b_ = batch, t_ = seq;
  const int64_t m = batch * seq, c = cfg_.d_inner, n = cfg_.d_state, r = cfg_.dt_rank,
                gn = cfg_.groups * n;
  const DType t = in_proj_->compute.dtype, f = in_proj_->value.dtype;
  xs_ = sv.take("m1.xs", t, {m, c});
  z_ = sv.take("m1.z", t, {m, c});
  xc_ = sv.take("m1.xc", t, {m, c});
  dtr_ = sv.take("m1.dt_raw", t, {m, r});
  bp_ = sv.take("m1.B", t, {m, gn});
  cp_ = sv.take("m1.C", t, {m, gn});
  if (cfg_.dt_bc_norm) {
    dtn_ = sv.take("m1.dt_normed", t, {m, r});
    bn_ = sv.take("m1.B_normed", t, {m, gn});
    cn_ = sv.take("m1.C_normed", t, {m, gn});
    rs_dt_ = sv.take("m1.rstd_dt", f, {m});
    rs_b_ = sv.take("m1.rstd_B", f, {m * cfg_.groups});
    rs_c_ = sv.take("m1.rstd_C", f, {m * cfg_.groups});
  } else {
    dtn_ = dtr_, bn_ = bp_, cn_ = cp_;
  }
  delta_ = sv.take("m1.delta", t, {m, c});
  a_ = sv.take("m1.A", f, {c, n});
  y_ = sv.take("m1.y", t, {m, c});
  dy_in_ = sc.take("m1.dy_scan", t, {m, c});
  dxc_ = sc.take("m1.dxc", t, {m, c});
  ddelta_ = sc.take("m1.ddelta", t, {m, c});
  dz_ = sc.take("m1.dz", t, {m, c});
  dbn_ = sc.take("m1.dB", t, {m, gn});
  dcn_ = sc.take("m1.dC", t, {m, gn});
  da_ = sc.take("m1.dA", f, {c, n});
  ddtn_ = sc.take("m1.ddt", t, {m, r});
  if (cfg_.dt_bc_norm) {
    ddtr_ = sc.take("m1.ddt_raw", t, {m, r});
    dbp_ = sc.take("m1.dB_raw", t, {m, gn});
    dcp_ = sc.take("m1.dC_raw", t, {m, gn});
  } else {
    ddtr_ = ddtn_, dbp_ = dbn_, dcp_ = dcn_;
  }
  dxs_ = sc.take("m1.dxs", t, {m, c});
  // The scan's [B,T,...] views of the saved tensors, and its workspace: on the GPU the forward
  // leaves chunk states there for the backward (saved), and the backward's partial sums go to a
  // scratch the layers share; on the CPU the workspace is the backward's scratch.
  xc3_ = xc_.reshape({batch, seq, c});
  delta3_ = delta_.reshape({batch, seq, c});
  z3_ = z_.reshape({batch, seq, c});
  b4_ = bn_.reshape({batch, seq, cfg_.groups, n});
  c4_ = cn_.reshape({batch, seq, cfg_.groups, n});
  const ScanInputs in = scan_inputs(BatchMeta{});
  const int64_t ws = selective_scan_workspace_elems(in);
  ws_ = xc_.device == Device::cuda ? sv.take("m1.scan_workspace", f, {ws})
                                   : sc.take("m1.scan_workspace", t, {ws});
  if (const int64_t e = selective_scan_scratch_elems(in))
    scan_scratch_ = sc.take("m1.scan_scratch", f, {e});
  if (context_parallel_) {
    entering_ = sv.take("m1.cp_entering_state", f, {batch, c, n});
    conv_entering_ = sv.take("m1.cp_conv_entering", t, {batch, c, cfg_.d_conv - 1});
  }
  // The conv's and the dt/B/C norms' backward workspaces (empty on the CPU).
  const Conv1dInputs conv{&xc3_, &conv_w_->compute, nullptr, nullptr, nullptr, true};
  conv_ws_ = sc.take("m1.conv_workspace", f, {causal_conv1d_workspace_elems(conv)});
  int64_t norm_ws = 0;
  if (cfg_.dt_bc_norm)
    for (const Tensor& x : {dtr_, bp_.reshape({m * cfg_.groups, n})})
      norm_ws = std::max(norm_ws, rmsnorm_workspace_elems(x));
  norm_ws_ = sc.take("m1.norm_workspace", f, {norm_ws});
}

ScanInputs Mamba1Mixer::scan_inputs(const BatchMeta& meta) const {
  ScanInputs in{&xc3_, &delta3_,      &a_,          &b4_,    &c4_, &d_->value,
                &z3_,  &dt_b_->value, meta.seq_idx, nullptr, true};
  if (scan_scratch_.data) in.scratch = &scan_scratch_;
  return in;
}

void Mamba1Mixer::forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) {
  const int64_t m = b_ * t_, c = cfg_.d_inner, n = cfg_.d_state, r = cfg_.dt_rank, g = cfg_.groups;
  BRAID_CHECK(!meta.cp || context_parallel_,
              "mamba1: a context-parallel forward, but the mixer was built without it");
  const Tensor x2 = x.reshape({m, cfg_.d_model});
  const Tensor& w_in = in_proj_->compute;
  const GemmContext* gemm = meta.gemm;
  linear_forward(x2, w_in.slice(0, 0, c), nullptr, xs_, gemm);
  linear_forward(x2, w_in.slice(0, c, c), nullptr, z_, gemm);
  const Tensor xs3 = xs_.reshape({b_, t_, c});
  const Conv1dInputs conv{&xs3, &conv_w_->compute, &conv_b_->compute, meta.seq_idx, nullptr, true};
  if (meta.cp)
    causal_conv1d_forward_cp(conv, xc3_, nullptr, conv_entering_, *meta.cp);
  else
    causal_conv1d_forward(conv, xc3_, nullptr);
  const Tensor& wx = x_proj_->compute;
  linear_forward(xc_, wx.slice(0, 0, r), nullptr, dtr_, gemm);
  linear_forward(xc_, wx.slice(0, r, g * n), nullptr, bp_, gemm);
  linear_forward(xc_, wx.slice(0, r + g * n, g * n), nullptr, cp_, gemm);
  for (const Tensor* t : {&dtr_, &bp_, &cp_}) tp_.sum(*t);  // the x_proj reduction
  if (cfg_.dt_bc_norm) {
    rmsnorm_forward(dtr_, dt_norm_->value, cfg_.norm_eps, dtn_, rs_dt_);
    rmsnorm_forward(bp_.reshape({m * g, n}), b_norm_->value, cfg_.norm_eps, bn_.reshape({m * g, n}),
                    rs_b_);
    rmsnorm_forward(cp_.reshape({m * g, n}), c_norm_->value, cfg_.norm_eps, cn_.reshape({m * g, n}),
                    rs_c_);
  }
  linear_forward(dtn_, dt_w_->compute, nullptr, delta_, gemm);
  neg_exp(a_log_->value, a_);
  if (meta.cp)
    selective_scan_forward_cp(scan_inputs(meta), y_.reshape({b_, t_, c}), nullptr, entering_, ws_,
                              *meta.cp);
  else
    selective_scan_forward(scan_inputs(meta), y_.reshape({b_, t_, c}), nullptr, &ws_);
  linear_forward(y_, out_proj_->compute, nullptr, y.reshape({m, cfg_.d_model}), gemm);
  tp_.reduce_output(y);
}

void Mamba1Mixer::backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                           const BatchMeta& meta) {
  const int64_t m = b_ * t_, c = cfg_.d_inner, n = cfg_.d_state, r = cfg_.dt_rank, g = cfg_.groups;
  const GemmContext* gemm = meta.gemm;
  linear_backward(y_, out_proj_->compute, dy.reshape({m, cfg_.d_model}), &dy_in_, out_proj_->grad,
                  nullptr, gemm);
  const ScanInputs in = scan_inputs(meta);
  const Tensor dxc3 = dxc_.reshape({b_, t_, c}), ddelta3 = ddelta_.reshape({b_, t_, c}),
               dz3 = dz_.reshape({b_, t_, c});
  const Tensor db4 = dbn_.reshape({b_, t_, g, n}), dc4 = dcn_.reshape({b_, t_, g, n});
  // dA accumulates inside the scan: start from zero, then fold into dA_log.
  zero_fill(da_);
  const ScanGrads sg{&dxc3, &ddelta3, &da_, &db4, &dc4, &d_->grad, &dz3, &dt_b_->grad, nullptr};
  if (meta.cp)
    selective_scan_backward_cp(in, entering_, dy_in_.reshape({b_, t_, c}), nullptr, sg, ws_,
                               *meta.cp);
  else
    selective_scan_backward(in, dy_in_.reshape({b_, t_, c}), nullptr, sg, ws_);
  neg_exp_backward(a_, da_, a_log_->grad);
  linear_backward(dtn_, dt_w_->compute, ddelta_, &ddtn_, dt_w_->grad, nullptr, gemm);
  // [dtr | Bp | Cp] was used whole by every rank: its gradient is the sum over the group.
  for (const Tensor* t : {&ddtn_, &dbn_, &dcn_}) tp_.sum(*t);
  if (cfg_.dt_bc_norm) {
    rmsnorm_backward(dtr_, dt_norm_->value, rs_dt_, ddtn_, ddtr_, dt_norm_->grad, &norm_ws_);
    rmsnorm_backward(bp_.reshape({m * g, n}), b_norm_->value, rs_b_, dbn_.reshape({m * g, n}),
                     dbp_.reshape({m * g, n}), b_norm_->grad, &norm_ws_);
    rmsnorm_backward(cp_.reshape({m * g, n}), c_norm_->value, rs_c_, dcn_.reshape({m * g, n}),
                     dcp_.reshape({m * g, n}), c_norm_->grad, &norm_ws_);
  }
  // x_proj: three row slices of one weight, each adding into dxc.
  const Tensor& wx = x_proj_->compute;
  const Tensor& gx = x_proj_->grad;
  linear_backward(xc_, wx.slice(0, 0, r), ddtr_, &dxc_, gx.slice(0, 0, r), nullptr, gemm, true);
  linear_backward(xc_, wx.slice(0, r, g * n), dbp_, &dxc_, gx.slice(0, r, g * n), nullptr, gemm,
                  true);
  linear_backward(xc_, wx.slice(0, r + g * n, g * n), dcp_, &dxc_, gx.slice(0, r + g * n, g * n),
                  nullptr, gemm, true);
  const Tensor xs3 = xs_.reshape({b_, t_, c}), dxs3 = dxs_.reshape({b_, t_, c});
  const Conv1dInputs conv{&xs3, &conv_w_->compute, &conv_b_->compute, meta.seq_idx, nullptr, true};
  const Conv1dGrads cg{&dxs3, &conv_w_->grad, &conv_b_->grad, nullptr};
  if (meta.cp)
    causal_conv1d_backward_cp(conv, conv_entering_, dxc3, nullptr, cg, *meta.cp, &conv_ws_);
  else
    causal_conv1d_backward(conv, dxc3, nullptr, cg, &conv_ws_);
  const Tensor x2 = x.reshape({m, cfg_.d_model}), dx2 = dx.reshape({m, cfg_.d_model});
  const Tensor& w_in = in_proj_->compute;
  const Tensor& g_in = in_proj_->grad;
  linear_backward(x2, w_in.slice(0, 0, c), dxs_, &dx2, g_in.slice(0, 0, c), nullptr, gemm);
  linear_backward(x2, w_in.slice(0, c, c), dz_, &dx2, g_in.slice(0, c, c), nullptr, gemm, true);
  tp_.reduce_output(dx2);
}

double Mamba1Mixer::flops_per_token(int64_t) const {
  const double d = global_.d_model, c = global_.d_inner, n = global_.d_state, r = global_.dt_rank,
               g = global_.groups;
  const double matmul = 2 * c * d + c * (r + 2 * g * n) + c * r + d * c;  // MACs per token
  // Scan: forward ~6 FLOPs per (channel, state) and token (decay, update, readout), backward 2x.
  const double scan = 18 * c * n;
  return 6 * matmul + scan + 6 * c * global_.d_conv;
}

}  // namespace braid
