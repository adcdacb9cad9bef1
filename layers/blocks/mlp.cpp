#include "layers/blocks/mlp.h"

#include "layers/linear/linear.h"
#include "layers/swiglu/swiglu.h"

namespace braid {

MlpBlock::MlpBlock(const MlpConfig& cfg, ParamSet& ps, const std::string& prefix, double init_std,
                   double out_std, const TensorParallel& tp)
    : cfg_(cfg), tp_(tp), ffn_(cfg.ffn / tp.size()) {
  const int64_t d = cfg.d_model, f = cfg.ffn;
  BRAID_CHECK(f % tp.size() == 0, "mlp.ffn = ", f, " is not divisible by tp = ", tp.size());
  gate_ = ps.add(pname(prefix, "gate_proj.weight"), {f, d}, {ParamInit::Kind::normal, init_std},
                 true, true, tp.shard(0));
  up_ = ps.add(pname(prefix, "up_proj.weight"), {f, d}, {ParamInit::Kind::normal, init_std}, true,
               true, tp.shard(0));
  down_ = ps.add(pname(prefix, "down_proj.weight"), {d, f}, {ParamInit::Kind::normal, out_std},
                 true, true, tp.shard(1));
}

void MlpBlock::plan(Arena& saved, Arena& scratch, int64_t batch, int64_t seq) {
  const int64_t m = batch * seq, f = ffn_;
  const DType t = gate_->compute.dtype;
  a_ = saved.take("mlp.gate_act", t, {m, f});
  b_ = saved.take("mlp.up_act", t, {m, f});
  h_ = saved.take("mlp.hidden", t, {m, f});
  da_ = scratch.take("mlp.d_gate", t, {m, f});
  db_ = scratch.take("mlp.d_up", t, {m, f});
  dh_ = scratch.take("mlp.d_hidden", t, {m, f});
}

void MlpBlock::forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) {
  const int64_t m = x.numel() / cfg_.d_model;
  const Tensor x2 = x.reshape({m, cfg_.d_model}), y2 = y.reshape({m, cfg_.d_model});
  linear_forward(x2, gate_->compute, nullptr, a_, meta.gemm);
  linear_forward(x2, up_->compute, nullptr, b_, meta.gemm);
  swiglu_forward(a_, b_, h_);
  linear_forward(h_, down_->compute, nullptr, y2, meta.gemm);
  tp_.reduce_output(y2);
}

void MlpBlock::backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                        const BatchMeta& meta) {
  const int64_t m = x.numel() / cfg_.d_model;
  const Tensor x2 = x.reshape({m, cfg_.d_model}), dx2 = dx.reshape({m, cfg_.d_model});
  const GemmContext* gemm = meta.gemm;
  linear_backward(h_, down_->compute, dy.reshape({m, cfg_.d_model}), &dh_, down_->grad, nullptr,
                  gemm);
  swiglu_backward(a_, b_, dh_, da_, db_);
  linear_backward(x2, gate_->compute, da_, &dx2, gate_->grad, nullptr, gemm);
  linear_backward(x2, up_->compute, db_, &dx2, up_->grad, nullptr, gemm, true);
  tp_.reduce_output(dx2);
}

}  // namespace braid
