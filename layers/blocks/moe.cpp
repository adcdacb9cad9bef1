#include "layers/blocks/moe.h"

#include "layers/elementwise/elementwise.h"
#include "layers/linear/linear.h"
#include "layers/moe_dispatch/moe_dispatch.h"
#include "layers/swiglu/swiglu.h"

namespace braid {

MoeBlock::MoeBlock(const MoeConfig& cfg, ParamSet& ps, const std::string& p, double init_std,
                   double out_std, const TensorParallel& tp, Communicator* ep)
    : cfg_(cfg),
      prefix_(p),
      tp_(tp),
      ep_(ep && ep->size() > 1 ? ep : nullptr),
      ffn_(cfg.ffn / tp.size()),
      router_{cfg.top_k, cfg.score, cfg.normalize_topk, cfg.capacity_factor} {
  const int64_t d = cfg.d_model, f = cfg.ffn, e = cfg.experts;
  BRAID_CHECK(f % tp.size() == 0, "moe.ffn = ", f, " is not divisible by tp = ", tp.size());
  const int eps = ep_ ? ep_->size() : 1;
  BRAID_CHECK(e % eps == 0, "moe.experts = ", e, " is not divisible by ep = ", eps);
  local_ = e / eps, e0_ = ep_ ? ep_->rank() * local_ : 0;
  router_w_ = ps.add(pname(p, "gate.weight"), {e, d}, {ParamInit::Kind::normal, init_std}, true);
  if (cfg.balance_bias)
    bias_ = ps.add(pname(p, "gate.e_score_correction_bias"), {e}, {ParamInit::Kind::constant, 0.0},
                   false, false);
  for (int64_t i = e0_; i < e0_ + local_; ++i) {
    const std::string en = pname(p, "experts." + std::to_string(i));
    const ParamInit in{ParamInit::Kind::normal, init_std}, out{ParamInit::Kind::normal, out_std};
    const int region = ep_ ? 1 : 0;  // split over ep: replicated only over expert data parallel
    experts_.push_back(
        {ps.add(pname(en, "gate_proj.weight"), {f, d}, in, true, true, tp.shard(0), region),
         ps.add(pname(en, "up_proj.weight"), {f, d}, in, true, true, tp.shard(0), region),
         ps.add(pname(en, "down_proj.weight"), {d, f}, out, true, true, tp.shard(1), region)});
  }
  if (cfg.shared_ffn > 0) {
    TensorParallel partial = tp;  // summed with the experts' outputs, once
    partial.partial_outputs = true;
    shared_ = std::make_unique<MlpBlock>(MlpConfig{d, cfg.shared_ffn}, ps,
                                         pname(p, "shared_expert"), init_std, out_std, partial);
  }
}

std::vector<RemoteParam> MoeBlock::remote_params() const {
  std::vector<RemoteParam> out;
  const int64_t d = cfg_.d_model, f = cfg_.ffn;
  for (int64_t i = 0; i < cfg_.experts; ++i) {
    if (i >= e0_ && i < e0_ + local_) continue;
    const std::string en = pname(prefix_, "experts." + std::to_string(i));
    out.push_back({pname(en, "gate_proj.weight"), {f, d}});
    out.push_back({pname(en, "up_proj.weight"), {f, d}});
    out.push_back({pname(en, "down_proj.weight"), {d, f}});
  }
  return out;
}

void MoeBlock::plan_state(Arena& state) {
  step_counts_ = state.take("moe.step_counts", DType::i32, {cfg_.experts});
}

void MoeBlock::plan(Arena& sv, Arena& sc, int64_t batch, int64_t seq) {
  m_ = batch * seq;
  const int64_t e = cfg_.experts, k = cfg_.top_k, d = cfg_.d_model, f = ffn_, rows = m_ * k;
  cap_ = router_capacity(router_, m_, e);
  // The token rows in the compute dtype; the router in f32 under mixed precision, else the same.
  const DType t = router_w_->compute.dtype,
              r = t == DType::bf16 || t == DType::f16 ? DType::f32 : t;
  logits_ = sv.take("moe.logits", r, {m_, e});
  if (router_w_->value.device == Device::cuda)
    loss_sums_ = sv.take("moe.loss_sums", DType::f64, {2});
  scores_ = sv.take("moe.scores", r, {m_, e});
  expert_ = sv.take("moe.expert", DType::i32, {m_, k});
  slot_ = sv.take("moe.slot", DType::i32, {m_, k});
  weight_ = sv.take("moe.weight", r, {m_, k});
  counts_ = sv.take("moe.counts", DType::i32, {e});
  offsets_ = sv.take("moe.offsets", DType::i32, {e + 1});
  row_token_ = sv.take("moe.row_token", DType::i32, {rows});
  // Rows at the experts: this rank's (M K), or under expert parallelism every rank's rows for
  // this rank's experts (at most ep M K).
  const int64_t at_experts = rows * (ep_ ? ep_->size() : 1);
  xe_ = sv.take("moe.x_rows", t, {rows, d});
  ga_ = sv.take("moe.gate_act", t, {at_experts, f});
  ua_ = sv.take("moe.up_act", t, {at_experts, f});
  he_ = sv.take("moe.hidden", t, {at_experts, f});
  oe_ = sv.take("moe.out_rows", t, {rows, d});
  if (ep_) {
    xr_ = sv.take("moe.x_rows_at_experts", t, {at_experts, d});
    or_ = sv.take("moe.out_rows_at_experts", t, {at_experts, d});
    dor_ = sc.take("moe.dout_rows_at_experts", t, {at_experts, d});
    dxr_ = sc.take("moe.dx_rows_at_experts", t, {at_experts, d});
    ep_counts_ = sc.take("moe.ep_counts", DType::i64, {2 * e});  // sent [E], received [ep local]
  }
  dweight_ = sc.take("moe.dweight", r, {m_, k});
  dlogits_ = sc.take("moe.dlogits", r, {m_, e});
  dlogits_c_ = t == r ? dlogits_ : sc.take("moe.dlogits_compute", t, {m_, e});
  if (router_w_->value.device == Device::cuda)
    router_ws_ = sc.take("moe.router_ws", DType::f64, {router_workspace_elems()});
  doe_ = sc.take("moe.dout_rows", t, {rows, d});
  dhe_ = sc.take("moe.dhidden", t, {at_experts, f});
  dga_ = sc.take("moe.dgate", t, {at_experts, f});
  dua_ = sc.take("moe.dup", t, {at_experts, f});
  dxe_ = sc.take("moe.dx_rows", t, {rows, d});
  dx_tmp_ = sc.take("moe.dx_tmp", t, {m_, d});
  if (shared_) {
    shared_out_ = sc.take("moe.shared_out", t, {m_, d});
    shared_->plan(sv, sc, batch, seq);
  }
}

void MoeBlock::forward(const Tensor& x, const Tensor& y, const BatchMeta& meta) {
  const int64_t d = cfg_.d_model;
  const Tensor x2 = x.reshape({m_, d}), y2 = y.reshape({m_, d});
  linear_forward(x2, router_w_->compute, nullptr, logits_, meta.gemm);
  const RouterLosses ls = router_forward(logits_, bias_ ? &bias_->value : nullptr, router_,
                                         {&scores_, &expert_, &slot_, &weight_, &counts_,
                                          &router_ws_, loss_sums_.data ? &loss_sums_ : nullptr});
  aux_ = cfg_.aux_loss_coef * ls.aux + cfg_.z_loss_coef * ls.z;
  if (meta.count_routing) router_accumulate_counts(step_counts_, counts_);
  rows_ = moe_dispatch_plan(expert_, slot_, counts_, cap_, offsets_, row_token_, &host_offsets_);
  moe_gather(x2, row_token_, rows_, xe_);
  if (ep_) {
    exchange_counts();
    to_experts(xe_, xr_);
    experts_forward(xr_, or_, meta.gemm);
    from_experts(or_, oe_);
  } else {
    experts_forward(xe_, oe_, meta.gemm);
  }
  moe_combine(oe_, expert_, slot_, offsets_, weight_, y2);
  if (shared_) {
    shared_->forward(x, shared_out_, meta);
    add_into(y2, shared_out_);
  }
  tp_.reduce_output(y2);
}

void MoeBlock::backward(const Tensor& x, const Tensor& dy, const Tensor& dx,
                        const BatchMeta& meta) {
  const int64_t d = cfg_.d_model;
  const Tensor x2 = x.reshape({m_, d}), dy2 = dy.reshape({m_, d}), dx2 = dx.reshape({m_, d});
  moe_combine_backward(dy2, oe_, expert_, slot_, offsets_, weight_, doe_, dweight_);
  tp_.sum(dweight_);  // <dy, expert output>: each rank holds a part of the expert outputs
  if (ep_) {
    to_experts(doe_, dor_);
    experts_backward(xr_, dor_, dxr_, meta.gemm);
    from_experts(dxr_, dxe_);
  } else {
    experts_backward(xe_, doe_, dxe_, meta.gemm);
  }
  zero_fill(dx2);
  moe_gather_backward(dxe_, expert_, slot_, offsets_, dx2);
  router_backward(logits_, router_, {&scores_, &expert_, &slot_, &weight_, &counts_}, dweight_,
                  cfg_.aux_loss_coef * meta.aux_loss_scale, cfg_.z_loss_coef * meta.aux_loss_scale,
                  dlogits_);
  if (dlogits_c_.data != dlogits_.data) cast_into(dlogits_c_, dlogits_);
  linear_backward(x2, router_w_->compute, dlogits_c_, &dx_tmp_, router_w_->grad, nullptr,
                  meta.gemm);
  // The router's input gradient is whole on every rank: one of them adds it to the partial sum.
  if (tp_.rank() == 0) add_into(dx2, dx_tmp_);
  if (shared_) {
    shared_->backward(x, dy, dx_tmp_.reshape({x.size(0), x.size(1), d}), meta);
    add_into(dx2, dx_tmp_);
  }
  tp_.reduce_output(dx2);
}

std::vector<MoeBlock::Segment> MoeBlock::segments() const {
  std::vector<Segment> out;
  if (!ep_) {
    const int32_t* off = host_offsets_.data();
    for (int e = 0; e < int(cfg_.experts); ++e)
      if (off[e + 1] > off[e]) out.push_back({off[e], off[e + 1] - off[e], e});
    return out;
  }
  // Received rows: by source rank, then by this rank's experts.
  int64_t r0 = 0;
  for (size_t i = 0; i < recv_expert_rows_.size(); ++i) {
    const int64_t n = recv_expert_rows_[i];
    if (n > 0) out.push_back({r0, n, int(i % local_)});
    r0 += n;
  }
  return out;
}

void MoeBlock::experts_forward(const Tensor& x_rows, const Tensor& out_rows,
                               const GemmContext* gemm) {
  for (const Segment& g : segments()) {
    const Expert& ex = experts_[g.e];
    const Tensor ga = ga_.slice(0, g.r0, g.n), ua = ua_.slice(0, g.r0, g.n),
                 he = he_.slice(0, g.r0, g.n), xs = x_rows.slice(0, g.r0, g.n);
    linear_forward(xs, ex.gate->compute, nullptr, ga, gemm);
    linear_forward(xs, ex.up->compute, nullptr, ua, gemm);
    swiglu_forward(ga, ua, he);
    linear_forward(he, ex.down->compute, nullptr, out_rows.slice(0, g.r0, g.n), gemm);
  }
}

void MoeBlock::experts_backward(const Tensor& x_rows, const Tensor& dout_rows,
                                const Tensor& dx_rows, const GemmContext* gemm) {
  for (const Segment& g : segments()) {
    const Expert& ex = experts_[g.e];
    const int64_t r0 = g.r0, n = g.n;
    const Tensor xs = x_rows.slice(0, r0, n), dxs = dx_rows.slice(0, r0, n);
    const Tensor dga = dga_.slice(0, r0, n), dua = dua_.slice(0, r0, n), dhe = dhe_.slice(0, r0, n);
    linear_backward(he_.slice(0, r0, n), ex.down->compute, dout_rows.slice(0, r0, n), &dhe,
                    ex.down->grad, nullptr, gemm);
    swiglu_backward(ga_.slice(0, r0, n), ua_.slice(0, r0, n), dhe, dga, dua);
    linear_backward(xs, ex.gate->compute, dga, &dxs, ex.gate->grad, nullptr, gemm);
    linear_backward(xs, ex.up->compute, dua, &dxs, ex.up->grad, nullptr, gemm, true);
  }
}

void MoeBlock::exchange_counts() {
  const int peers = ep_->size();
  const int64_t d = cfg_.d_model;
  const int32_t* off = host_offsets_.data();
  std::vector<int64_t> mine(cfg_.experts);
  for (int64_t e = 0; e < cfg_.experts; ++e) mine[e] = off[e + 1] - off[e];
  const std::vector<int64_t> per_peer(peers, local_);
  const Tensor sent = ep_counts_.slice(0, 0, cfg_.experts),
               received = ep_counts_.slice(0, cfg_.experts, peers * local_);
  moe_counts_store(mine, sent);
  ep_->all_to_all_v(sent, per_peer, received, per_peer);
  recv_expert_rows_ = moe_counts_load(received);
  send_rows_.assign(peers, 0), recv_rows_.assign(peers, 0);  // elements (rows x D)
  for (int q = 0; q < peers; ++q)
    for (int64_t j = 0; j < local_; ++j) {
      send_rows_[q] += mine[q * local_ + j] * d;
      recv_rows_[q] += recv_expert_rows_[q * local_ + j] * d;
    }
}

void MoeBlock::to_experts(const Tensor& rows, const Tensor& recv) {
  ep_->all_to_all_v(rows, send_rows_, recv, recv_rows_);
}

void MoeBlock::from_experts(const Tensor& recv, const Tensor& rows) {
  ep_->all_to_all_v(recv, recv_rows_, rows, send_rows_);
}

double MoeBlock::aux_loss() const {
  if (!loss_sums_.data) return aux_;
  const RouterLosses ls = router_losses(loss_sums_, m_, cfg_.experts, cfg_.top_k);
  return cfg_.aux_loss_coef * ls.aux + cfg_.z_loss_coef * ls.z;
}

void MoeBlock::after_optimizer_step() {
  if (bias_)
    router_update_bias(bias_->value, step_counts_, cfg_.bias_update_rate);
  else
    zero_fill(step_counts_);
}

double MoeBlock::flops_per_token(int64_t seq) const {
  const double d = cfg_.d_model;
  // Router plus the K active experts (3 matmuls of D x F each); 6 FLOPs per MAC for fwd + bwd.
  double f = 6 * (d * cfg_.experts + cfg_.top_k * 3.0 * d * cfg_.ffn);
  if (shared_) f += shared_->flops_per_token(seq);
  return f;
}

}  // namespace braid
