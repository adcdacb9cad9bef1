#include "optim/adamw.h"

#include <cmath>

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
    : params_(params), cfg_(cfg) {
  BRAID_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1,
              "optim: beta1 and beta2 must be in [0, 1)");
  BRAID_CHECK(cfg.eps > 0, "optim.eps must be positive");
  BRAID_CHECK(cfg.weight_decay >= 0, "optim.weight_decay must be non-negative");
  auto take_all = [&](Arena& a) {
    state_.clear();
    for (const Param& p : params.all()) {
      if (!p.trainable) continue;
      state_.push_back({&p, a.take(p.name + ".master", DType::f32, p.shape),
                        a.take(p.name + ".exp_avg", DType::f32, p.shape),
                        a.take(p.name + ".exp_avg_sq", DType::f32, p.shape)});
    }
  };
  Arena plan = Arena::measuring("optimizer", backend.device());
  take_all(plan);
  arena_ = Arena::allocate("optimizer", backend, plan.high_water());
  take_all(arena_);
  backend.fill(arena_.bytes(), 0.0, {});
  int64_t most = 0;
  for (const State& st : state_) most = std::max(most, (st.master.numel() + kBlock - 1) / kBlock);
  partials_.resize(static_cast<size_t>(most));
  for (State& s : state_) {
    BRAID_CHECK(s.param->value.device == Device::cpu, "AdamW: parameter ", s.param->name,
                " is on the GPU and the fused CUDA AdamW is not built yet");
    BRAID_CHECK(s.param->value.dtype == DType::f32, "AdamW: parameter ", s.param->name,
                " has dtype ", dtype_name(s.param->value.dtype),
                "; the CPU optimizer trains f32 parameters");
    const float* v = s.param->value.ptr<float>();
    std::copy(v, v + s.master.numel(), s.master.ptr<float>());
  }
}

double AdamW::grad_norm() const {
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
