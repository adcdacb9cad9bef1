#include "optim/zero1_adamw.h"

#include <cmath>

#include "optim/adamw_cuda.h"

namespace braid {

Zero1AdamW::Zero1AdamW(ParamSet& params, const AdamWConfig& cfg, Backend& backend, Communicator& dp,
                       Communicator* tp, int region)
    : params_(params),
      cfg_(cfg),
      dp_(dp),
      tp_(tp && tp->size() > 1 ? tp : nullptr),
      region_(region),
      gpu_(backend.device() == Device::cuda),
      backend_(backend) {
  const Tensor flat = params.region_values(region);
  BRAID_CHECK(flat.dtype == DType::f32 && flat.device == backend.device(),
              "ZeRO-1 AdamW: parameters must be f32 tensors on the optimizer's device, got ",
              flat.describe());
  BRAID_CHECK(flat.numel() % dp.size() == 0, "ZeRO-1 AdamW: ", flat.numel(),
              " parameter elements do not split over ", dp.size(),
              " ranks (allocate with pad_elems = dp size)");
  shard_ = flat.numel() / dp.size();
  begin_ = shard_ * dp.rank();
  if (gpu_) {
    init_gpu();
    return;
  }
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

void Zero1AdamW::init_gpu() {
  // The chunk table: every kAdamChunk elements of each trainable parameter's part of the shard.
  // All pointers are the shard's bases (the values and gradients at begin_, the moments); a task
  // is a range of shard elements.
  std::vector<AdamTask> tasks;
  auto take_all = [&](Arena& a) {
    gpu_m_ = a.take("zero1.exp_avg", DType::f32, {shard_});
    gpu_v_ = a.take("zero1.exp_avg_sq", DType::f32, {shard_});
    tasks.clear(), runs_.clear();
    float* values = params_.region_values(region_).ptr<float>();
    float* grads = params_.region_grads(region_).ptr<float>();
    for (const Param& p : params_.all()) {
      if (!p.trainable || p.region != region_) continue;
      const int64_t off = params_.region_offset(p), n = p.value.numel();
      const int64_t lo = std::max(off, begin_), hi = std::min(off + n, begin_ + shard_);
      if (lo >= hi) continue;
      runs_.push_back({lo - begin_, hi - lo});
      // Norm group 1: a parameter every tp rank holds whole (counted once over the tp group); 2:
      // a mirror (not counted: its original is, on the rank that holds it).
      const int group = p.mirror ? 2 : tp_ && p.boxes.empty() ? 1 : 0;
      for (int64_t b = lo - begin_; b < hi - begin_; b += kAdamChunk)
        tasks.push_back({values + begin_, nullptr, grads + begin_, values + begin_,
                         gpu_m_.ptr<float>(), gpu_v_.ptr<float>(), b,
                         std::min(kAdamChunk, hi - begin_ - b), p.weight_decay ? 1 : 0, 0, group});
    }
    n_tasks_ = static_cast<int>(tasks.size());
    const int64_t words = (int64_t(tasks.size()) * int64_t(sizeof(AdamTask)) + 7) / 8;
    tasks_ = a.take("zero1.tasks", DType::i64, {std::max<int64_t>(words, 1)});
    partials_ = a.take("zero1.partials", DType::f64, {std::max(n_tasks_, 1)});
    total_ = a.take("zero1.total", DType::f64, {2});
  };
  Arena plan = Arena::measuring("optimizer", Device::cuda);
  take_all(plan);
  arena_ = Arena::allocate("optimizer", backend_, plan.high_water());
  take_all(arena_);
  backend_.fill(arena_.bytes(), 0.0, {});
  backend_.copy(tasks_.data, Device::cuda, tasks.data(), Device::cpu,
                tasks.size() * sizeof(AdamTask), {});
  backend_.synchronize({});
}

void Zero1AdamW::reduce_gradients() {
  const Tensor grads = params_.region_grads(region_);
  if (gpu_)  // in place: this rank's shard of the gradient vector
    return dp_.reduce_scatter(grads, grads.slice(0, begin_, shard_), ReduceOp::sum);
  dp_.reduce_scatter(
      grads, Tensor::contiguous_view(grad_.data(), DType::f32, Device::cpu, {shard_}, "grad_shard"),
      ReduceOp::sum);
}

void Zero1AdamW::use_reduced_gradients() {
  if (gpu_) return;  // the tasks read the shard in the gradient vector
  const float* g = params_.region_grads(region_).ptr<float>() + begin_;
  std::copy(g, g + shard_, grad_.begin());
}

double Zero1AdamW::grad_norm_sq() {
  if (gpu_) {              // per-chunk f64 partials added in order, then summed over the groups
    double s[2] = {0, 0};  // as below: tensor-parallel shards, parameters every tp rank holds
#if defined(BRAID_WITH_CUDA)
    adamw_grad_sq_cuda(static_cast<const AdamTask*>(tasks_.data), n_tasks_, partials_.ptr<double>(),
                       total_.ptr<double>(), nullptr);
    dp_.all_reduce(total_, ReduceOp::sum);
    if (tp_) tp_->all_reduce(total_, ReduceOp::sum);
    backend_.copy(s, Device::cpu, total_.data, Device::cuda, sizeof(s), {});
    backend_.synchronize({});
#endif
    return s[0] + (tp_ ? s[1] / tp_->size() : s[1]);
  }
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
  const Tensor values = params_.region_values(region_);
  if (gpu_) {  // the shard updated in place, then the other ranks' shards gathered around it
#if defined(BRAID_WITH_CUDA)
    adamw_step_cuda(static_cast<const AdamTask*>(tasks_.data), n_tasks_,
                    {c, b1, b2, eps, step_size, inv_sqrt_bc2, decay_factor}, nullptr);
#endif
    dp_.all_gather(Tensor::contiguous_view(values.ptr<float>() + begin_, DType::f32, Device::cuda,
                                           {shard_}, "param_shard"),
                   values);
    return;
  }
  for (int64_t i = 0; i < shard_; ++i) {
    if (mask_[i] != frozen) {  // the same arithmetic as AdamW::step
      const float gi = grad_[i] * c;
      m_[i] = b1 * m_[i] + (1.0f - b1) * gi;
      v_[i] = b2 * v_[i] + (1.0f - b2) * gi * gi;
      master_[i] = master_[i] * (mask_[i] == decay ? decay_factor : 1.0f) -
                   step_size * m_[i] / (std::sqrt(v_[i]) * inv_sqrt_bc2 + eps);
      send_[i] = master_[i];
    } else {
      send_[i] = values.ptr<float>()[begin_ + i];  // frozen: unchanged
    }
  }
  dp_.all_gather(
      Tensor::contiguous_view(send_.data(), DType::f32, Device::cpu, {shard_}, "param_shard"),
      values);
}

void Zero1AdamW::gather_state(std::vector<float>& master, std::vector<float>& m,
                              std::vector<float>& v) {
  BRAID_CHECK(!gpu_, "Zero1AdamW::gather_state: host state only");
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
  t_ = steps_taken;
  if (gpu_) {  // the master into the values' trainable runs (the rest of the shard is kept)
    float* values = params_.region_values(region_).ptr<float>() + begin_;
    for (auto [at, n] : runs_)
      backend_.copy(values + at, Device::cuda, master.data() + at, Device::cpu, n * sizeof(float),
                    {});
    backend_.copy(gpu_m_.data, Device::cuda, m.data(), Device::cpu, shard_ * sizeof(float), {});
    backend_.copy(gpu_v_.data, Device::cuda, v.data(), Device::cpu, shard_ * sizeof(float), {});
    backend_.synchronize({});
    return;
  }
  master_ = master, m_ = m, v_ = v;
}

}  // namespace braid
