#include "optim/zero1_adamw.h"

#include <cmath>

namespace braid {

Zero1AdamW::Zero1AdamW(ParamSet& params, const AdamWConfig& cfg, Backend& backend, Communicator& dp,
                       Communicator* tp, int region)
    : params_(params),
      cfg_(cfg),
      dp_(dp),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      region_(region) {
  (void)backend;
  const Tensor flat = params.region_values(region);
  BRAID_CHECK(flat.dtype == DType::f32 && flat.device == Device::cpu,
              "ZeRO-1 AdamW (CPU): parameters must be f32 host tensors, got ", flat.describe());
  BRAID_CHECK(flat.numel() % dp.size() == 0, "ZeRO-1 AdamW: ", flat.numel(),
              " parameter elements do not split over ", dp.size(),
              " ranks (allocate with pad_elems = dp size)");
  shard_ = flat.numel() / dp.size();
  begin_ = shard_ * dp.rank();
  mask_.assign(shard_, frozen);
  count_.assign(shard_, sharded);
  for (const Param& p : params.all()) {
    if (!p.trainable || p.region != region) continue;
    const int64_t off = params.region_offset(p), n = p.value.numel();
    const int64_t lo = std::max(off, begin_), hi = std::min(off + n, begin_ + shard_);
    for (int64_t i = lo; i < hi; ++i) {
      mask_[i - begin_] = p.weight_decay ? decay : no_decay;
      count_[i - begin_] = p.mirror ? mirror : p.boxes.empty() ? replicated : sharded;
    }
  }
  const float* v = flat.ptr<float>() + begin_;
  master_.assign(v, v + shard_);
  m_.assign(shard_, 0.f);
  v_.assign(shard_, 0.f);
  grad_.assign(shard_, 0.f);
  send_.assign(shard_, 0.f);
}

void Zero1AdamW::reduce_gradients() {
  dp_.reduce_scatter(
      params_.region_grads(region_),
      Tensor::contiguous_view(grad_.data(), DType::f32, Device::cpu, {shard_}, "grad_shard"),
      ReduceOp::sum);
}

double Zero1AdamW::grad_norm_sq() {
  // [sum over tensor-parallel shards, sum over elements every tp rank holds]
  std::vector<double> s{0, 0};
  for (int64_t i = 0; i < shard_; ++i)
    if (count_[i] != mirror)
      s[tp_ && count_[i] == replicated] += double(grad_[i]) * double(grad_[i]);
  auto sum = [&](Communicator& c) {
    c.all_reduce(Tensor::contiguous_view(s.data(), DType::f64, Device::cpu, {2}, "grad_norm"),
                 ReduceOp::sum);
  };
  sum(dp_);
  if (tp_) sum(*tp_);  // the replicated sums are equal on every tp rank: counted once below
  return s[0] + (tp_ ? s[1] / tp_->size() : s[1]);
}

void Zero1AdamW::step(double lr, double norm) {
  ++t_;
  const double clip = cfg_.grad_clip > 0 ? std::min(1.0, cfg_.grad_clip / (norm + 1e-6)) : 1.0;
  const double bc1 = 1 - std::pow(cfg_.beta1, double(t_)),
               bc2 = 1 - std::pow(cfg_.beta2, double(t_));
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps),
              c = float(clip);
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  const float decay_factor = float(1.0 - lr * cfg_.weight_decay);
  for (int64_t i = 0; i < shard_; ++i) {
    if (mask_[i] != frozen) {  // the same arithmetic as AdamW::step
      const float gi = grad_[i] * c;
      m_[i] = b1 * m_[i] + (1.0f - b1) * gi;
      v_[i] = b2 * v_[i] + (1.0f - b2) * gi * gi;
      master_[i] = master_[i] * (mask_[i] == decay ? decay_factor : 1.0f) -
                   step_size * m_[i] / (std::sqrt(v_[i]) * inv_sqrt_bc2 + eps);
      send_[i] = master_[i];
    } else {
      send_[i] = params_.region_values(region_).ptr<float>()[begin_ + i];  // frozen: unchanged
    }
  }
  dp_.all_gather(
      Tensor::contiguous_view(send_.data(), DType::f32, Device::cpu, {shard_}, "param_shard"),
      params_.region_values(region_));
}

void Zero1AdamW::gather_state(std::vector<float>& master, std::vector<float>& m,
                              std::vector<float>& v) {
  const int64_t n = shard_ * dp_.size();
  for (auto [shard, full] :
       {std::pair{&master_, &master}, std::pair{&m_, &m}, std::pair{&v_, &v}}) {
    full->resize(n);
    dp_.all_gather(
        Tensor::contiguous_view(shard->data(), DType::f32, Device::cpu, {shard_}, "state_shard"),
        Tensor::contiguous_view(full->data(), DType::f32, Device::cpu, {n}, "state"));
  }
}

void Zero1AdamW::load_shard(const std::vector<float>& master, const std::vector<float>& m,
                            const std::vector<float>& v, int64_t steps_taken) {
  BRAID_CHECK(int64_t(master.size()) == shard_ && int64_t(m.size()) == shard_ &&
                  int64_t(v.size()) == shard_,
              "Zero1AdamW::load_shard: expected ", shard_, " elements");
  master_ = master, m_ = m, v_ = v;
  t_ = steps_taken;
}

}  // namespace braid
