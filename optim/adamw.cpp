#include "optim/adamw.h"

#include <cmath>

#include "optim/adamw_cuda.h"

#include "runtime/parallel_for.h"

namespace braid {
namespace {

constexpr int64_t kBlock = 4096;

// Sum of squares in fixed blocks added in order: the same result for any thread count. `part`
// holds one partial sum per block.
double sum_squares(const float* g, int64_t n, double* part) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  parallel_for(nb, [&](int64_t b) {
    double s = 0;
    for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i)
      s += double(g[i]) * double(g[i]);
    part[b] = s;
  });
  double s = 0;
  for (int64_t b = 0; b < nb; ++b) s += part[b];
  return s;
}

}  // namespace

AdamW::AdamW(ParamSet& params, const AdamWConfig& cfg, Backend& backend)
    : params_(params), cfg_(cfg), backend_(backend) {
  BRAID_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1,
              "optim: beta1 and beta2 must be in [0, 1)");
  BRAID_CHECK(cfg.eps > 0, "optim.eps must be positive");
  BRAID_CHECK(cfg.weight_decay >= 0, "optim.weight_decay must be non-negative");
  gpu_ = backend.device() == Device::cuda;
#if !defined(BRAID_WITH_CUDA)
  BRAID_CHECK(!gpu_, "AdamW: parameters on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#endif
  // The GPU's chunk table: every kAdamChunk elements of every trainable parameter.
  std::vector<AdamTask> tasks;
  auto take_all = [&](Arena& a) {
    state_.clear(), tasks.clear();
    for (const Param& p : params.all()) {
      if (!p.trainable) continue;
      // An f32 parameter is its own master (mixed precision keeps f32 parameters and bf16
      // copies); a bf16 one gets an f32 master here.
      state_.push_back(
          {&p,
           p.value.dtype == DType::f32 ? p.value : a.take(p.name + ".master", DType::f32, p.shape),
           a.take(p.name + ".exp_avg", DType::f32, p.shape),
           a.take(p.name + ".exp_avg_sq", DType::f32, p.shape)});
      const State& st = state_.back();
      for (int64_t b = 0; b < st.master.numel(); b += kAdamChunk)
        tasks.push_back({p.value.data,
                         p.compute.data != p.value.data && p.compute.dtype == DType::bf16
                             ? p.compute.data
                             : nullptr,
                         p.grad.data, st.master.ptr<float>(), st.m.ptr<float>(), st.v.ptr<float>(),
                         b, std::min(kAdamChunk, st.master.numel() - b), p.weight_decay ? 1 : 0,
                         p.value.dtype == DType::bf16 ? 1 : 0});
    }
    if (gpu_) {
      n_tasks_ = static_cast<int>(tasks.size());
      const int64_t words = (int64_t(tasks.size()) * int64_t(sizeof(AdamTask)) + 7) / 8;
      tasks_ = a.take("adamw.tasks", DType::i64, {std::max<int64_t>(words, 1)});
      gpu_partials_ = a.take("adamw.partials", DType::f64, {std::max(n_tasks_, 1)});
      gpu_total_ = a.take("adamw.total", DType::f64, {2});
    }
  };
  Arena plan = Arena::measuring("optimizer", backend.device());
  take_all(plan);
  arena_ = Arena::allocate("optimizer", backend, plan.high_water());
  take_all(arena_);
  backend.fill(arena_.bytes(), 0.0, {});
  for (State& s : state_) {
    const DType dt = s.param->value.dtype;
    BRAID_CHECK(s.param->value.device == backend.device(), "AdamW: parameter ", s.param->name,
                " is not on the optimizer's device");
    BRAID_CHECK(s.param->compute.data == s.param->value.data ||
                    (gpu_ && s.param->compute.dtype == DType::bf16),
                "AdamW: parameter ", s.param->name, " has a compute copy of dtype ",
                dtype_name(s.param->compute.dtype),
                "; the optimizer writes bf16 copies on the GPU");
    BRAID_CHECK(dt == DType::f32 || (gpu_ && dt == DType::bf16), "AdamW: parameter ", s.param->name,
                " has dtype ", dtype_name(dt),
                gpu_ ? "; the GPU optimizer trains f32 or bf16 parameters"
                     : "; the CPU optimizer trains f32 parameters");
  }
  if (gpu_) {
#if defined(BRAID_WITH_CUDA)
    backend.copy(tasks_.data, Device::cuda, tasks.data(), Device::cpu,
                 tasks.size() * sizeof(AdamTask), {});
    adamw_init_master_cuda(static_cast<const AdamTask*>(tasks_.data), n_tasks_, nullptr);
    backend.synchronize({});
#endif
    return;
  }
  int64_t most = 0;
  for (const State& st : state_) most = std::max(most, (st.master.numel() + kBlock - 1) / kBlock);
  partials_.resize(static_cast<size_t>(most));
  for (State& s : state_) {
    const float* v = s.param->value.ptr<float>();
    if (s.master.data != v) std::copy(v, v + s.master.numel(), s.master.ptr<float>());
  }
}

double AdamW::grad_norm() const {
  if (gpu_) {
    double total = 0;  // the tasks are all of norm group 0
#if defined(BRAID_WITH_CUDA)
    adamw_grad_sq_cuda(static_cast<const AdamTask*>(tasks_.data), n_tasks_,
                       gpu_partials_.ptr<double>(), gpu_total_.ptr<double>(), nullptr);
    backend_.copy(&total, Device::cpu, gpu_total_.data, Device::cuda, sizeof(double), {});
    backend_.synchronize({});
#endif
    return std::sqrt(total);
  }
  double s = 0;
  for (const State& st : state_) {
    const Tensor& g = st.param->grad;
    BRAID_CHECK(g.dtype == DType::f32, "AdamW: gradient of ", st.param->name, " is ",
                dtype_name(g.dtype), "; the CPU optimizer takes f32 gradients");
    s += sum_squares(g.ptr<float>(), g.numel(), partials_.data());
  }
  return std::sqrt(s);
}

void AdamW::step(double lr, double norm) {
  ++t_;
  const double clip = cfg_.grad_clip > 0 ? std::min(1.0, cfg_.grad_clip / (norm + 1e-6)) : 1.0;
  const double bc1 = 1 - std::pow(cfg_.beta1, double(t_)),
               bc2 = 1 - std::pow(cfg_.beta2, double(t_));
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps);
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  if (gpu_) {
#if defined(BRAID_WITH_CUDA)
    const AdamStep s{
        float(clip), b1, b2, eps, step_size, inv_sqrt_bc2, float(1.0 - lr * cfg_.weight_decay)};
    adamw_step_cuda(static_cast<const AdamTask*>(tasks_.data), n_tasks_, s, nullptr);
#endif
    return;
  }
  for (State& st : state_) {
    const float decay = st.param->weight_decay ? float(1.0 - lr * cfg_.weight_decay) : 1.0f;
    const int64_t n = st.master.numel();
    float *p = st.master.ptr<float>(), *m = st.m.ptr<float>(), *v = st.v.ptr<float>();
    const float* g = st.param->grad.ptr<float>();
    float* out = st.param->value.ptr<float>();
    const float c = float(clip);
    parallel_for((n + kBlock - 1) / kBlock, [&](int64_t b) {
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
        const float gi = g[i] * c;
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        p[i] = p[i] * decay - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
        out[i] = p[i];
      }
    });
  }
}

}  // namespace braid
