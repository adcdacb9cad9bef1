#include "layers/blocks/attention_block.h"

#include <cmath>

#include "layers/attention/attention_cp.h"
#include "layers/linear/linear.h"
#include "layers/rope/rope.h"

namespace braid {

AttentionBlock::AttentionBlock(const AttentionConfig& cfg, ParamSet& ps, const std::string& p,
                               double init_std, double out_std, const TensorParallel& tp)
    : cfg_(cfg), tp_(tp), h_(cfg.heads / tp.size()), hk_(cfg.kv_heads / tp.size()) {
  BRAID_CHECK(cfg.heads % tp.size() == 0 && cfg.kv_heads % tp.size() == 0,
              "attention: tp = ", tp.size(), " must divide heads = ", cfg.heads,
              " and kv_heads = ", cfg.kv_heads);
  const int64_t d = cfg.d_model, hp = cfg.heads * cfg.head_dim, kp = cfg.kv_heads * cfg.head_dim;
  const ParamInit in{ParamInit::Kind::normal, init_std}, out{ParamInit::Kind::normal, out_std};
  q_ = ps.add(pname(p, "q_proj.weight"), {hp, d}, in, true, true, tp.shard(0));
  k_ = ps.add(pname(p, "k_proj.weight"), {kp, d}, in, true, true, tp.shard(0));
  v_ = ps.add(pname(p, "v_proj.weight"), {kp, d}, in, true, true, tp.shard(0));
  o_ = ps.add(pname(p, "o_proj.weight"), {d, hp}, out, true, true, tp.shard(1));
}

void AttentionBlock::plan(Arena& sv, Arena& sc, int64_t batch, int64_t seq) {
  b_ = batch, t_ = seq;
  const DType t = q_->compute.dtype, f = q_->value.dtype;
  const int64_t h = h_, hk = hk_, p = cfg_.head_dim;
  qt_ = sv.take("attn.q", t, {batch, seq, h, p});
  kt_ = sv.take("attn.k", t, {batch, seq, hk, p});
  vt_ = sv.take("attn.v", t, {batch, seq, hk, p});
  ot_ = sv.take("attn.o", t, {batch, seq, h, p});
  lse_ = sv.take("attn.lse", f, {batch, h, seq});
  dq_ = sc.take("attn.dq", t, {batch, seq, h, p});
  dk_ = sc.take("attn.dk", t, {batch, seq, hk, p});
  dv_ = sc.take("attn.dv", t, {batch, seq, hk, p});
  do_ = sc.take("attn.do", t, {batch, seq, h, p});
  const AttentionInputs in{&qt_, &kt_, &vt_};
  ws_ = sc.take("attn.workspace", f,
                {qt_.device == Device::cuda ? attention_gpu_workspace_elems(in) : 0});
}

void AttentionBlock::forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) {
  const int64_t m = b_ * t_, h = h_, hk = hk_, p = cfg_.head_dim;
  const Tensor x2 = x.reshape({m, cfg_.d_model});
  const GemmContext* gemm = meta.gemm;
  linear_forward(x2, q_->compute, nullptr, qt_.reshape({m, h * p}), gemm);
  linear_forward(x2, k_->compute, nullptr, kt_.reshape({m, hk * p}), gemm);
  linear_forward(x2, v_->compute, nullptr, vt_.reshape({m, hk * p}), gemm);
  if (cfg_.rope) {
    BRAID_CHECK(meta.positions, "attention with RoPE needs the batch's positions");
    rope_forward(qt_, *meta.positions, cfg_.rope_theta, qt_);
    rope_forward(kt_, *meta.positions, cfg_.rope_theta, kt_);
  }
  const AttentionInputs in{&qt_, &kt_, &vt_, meta.seq_idx, 1.0 / std::sqrt(double(p))};
  if (meta.cp)
    attention_forward_cp(in, ot_, lse_, *meta.cp);
  else
    attention_forward(in, ot_, lse_);
  linear_forward(ot_.reshape({m, h * p}), o_->compute, nullptr, y.reshape({m, cfg_.d_model}), gemm);
  tp_.reduce_output(y);
}

void AttentionBlock::backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                              const BatchMeta& meta) {
  const int64_t m = b_ * t_, h = h_, hk = hk_, p = cfg_.head_dim;
  const Tensor do2 = do_.reshape({m, h * p});
  const GemmContext* gemm = meta.gemm;
  linear_backward(ot_.reshape({m, h * p}), o_->compute, dy.reshape({m, cfg_.d_model}), &do2,
                  o_->grad, nullptr, gemm);
  AttentionInputs in{&qt_, &kt_, &vt_, meta.seq_idx, 1.0 / std::sqrt(double(p))};
  in.workspace = &ws_;
  if (meta.cp)
    attention_backward_cp(in, ot_, lse_, do_, dq_, dk_, dv_, *meta.cp);
  else
    attention_backward(in, ot_, lse_, do_, dq_, dk_, dv_);
  if (cfg_.rope) {
    rope_backward(dq_, *meta.positions, cfg_.rope_theta, dq_);
    rope_backward(dk_, *meta.positions, cfg_.rope_theta, dk_);
  }
  const Tensor x2 = x.reshape({m, cfg_.d_model}), dx2 = dx.reshape({m, cfg_.d_model});
  linear_backward(x2, q_->compute, dq_.reshape({m, h * p}), &dx2, q_->grad, nullptr, gemm);
  linear_backward(x2, k_->compute, dk_.reshape({m, hk * p}), &dx2, k_->grad, nullptr, gemm, true);
  linear_backward(x2, v_->compute, dv_.reshape({m, hk * p}), &dx2, v_->grad, nullptr, gemm, true);
  tp_.reduce_output(dx2);
}

double AttentionBlock::flops_per_token(int64_t seq) const {
  const double d = cfg_.d_model, hp = cfg_.heads * cfg_.head_dim,
               kp = cfg_.kv_heads * cfg_.head_dim;
  const double proj = d * hp * 2 + d * kp * 2;  // MACs per token
  // Causal attention per token: q.k and p.v over seq/2 keys on average, 2 FLOPs per MAC;
  // backward 2.5x forward (as FlashAttention counts).
  const double attn = 2.0 * 2.0 * hp * (double(seq) / 2.0);
  return 6 * proj + 3.5 * attn;
}

}  // namespace braid
