#include <cmath>

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#endif

#include "layers/common/op_common.h"
#include "layers/moe_router/moe_router.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_router(const Tensor& logits, const RouterConfig& cfg, const RouterOutputs& o) {
  BRAID_CHECK(logits.ndim == 2, "moe_router: logits must be [M,E], got ", logits.describe());
  const int64_t m = logits.size(0), e = logits.size(1);
  BRAID_CHECK(cfg.top_k >= 1 && cfg.top_k <= e, "moe_router: top_k ", cfg.top_k,
              " must be in [1, experts = ", e, "]");
  BRAID_CHECK(o.scores && o.expert && o.slot && o.weight && o.counts,
              "moe_router: scores, expert, slot, weight and counts are required");
  check_shape(*o.scores, {m, e});
  check_shape(*o.expert, {m, cfg.top_k});
  check_shape(*o.slot, {m, cfg.top_k});
  check_shape(*o.weight, {m, cfg.top_k});
  check_shape(*o.counts, {e});
  BRAID_CHECK(
      o.expert->dtype == DType::i32 && o.slot->dtype == DType::i32 && o.counts->dtype == DType::i32,
      "moe_router: expert, slot and counts must be i32");
  check_same_dtype(logits, *o.scores);
  check_same_dtype(logits, *o.weight);
  if (logits.device == Device::cuda) {
    require_gpu("moe_router", {&logits, o.scores, o.expert, o.slot, o.weight, o.counts});
    require_dtype("moe_router", DType::f32, {&logits, o.scores, o.weight});
  } else {
    require_host("moe_router", {&logits, o.scores, o.expert, o.slot, o.weight, o.counts});
  }
}

#if defined(BRAID_WITH_CUDA)
RouterLosses router_forward_gpu(const Tensor& logits, const Tensor* bias, const RouterConfig& cfg,
                                const RouterOutputs& o) {
  const int64_t m = logits.size(0), e = logits.size(1), k = cfg.top_k;
  BRAID_CHECK(o.workspace && o.workspace->device == Device::cuda &&
                  o.workspace->dtype == DType::f64 &&
                  o.workspace->numel() >= router_workspace_elems(),
              "moe_router on the GPU: a f64 workspace of ", router_workspace_elems(),
              " elements is required");
  if (bias) require_gpu("moe_router", {bias}), require_dtype("moe_router", DType::f32, {bias});
  double* ws = o.workspace->ptr<double>();
  if (o.loss_sums)
    BRAID_CHECK(o.loss_sums->device == Device::cuda && o.loss_sums->dtype == DType::f64 &&
                    o.loss_sums->numel() == 2,
                "moe_router: loss_sums ", o.loss_sums->describe(), " must be f64 [2] on the GPU");
  double* sums = o.loss_sums ? o.loss_sums->ptr<double>() : ws + router_workspace_elems() - 2;
  router_forward_cuda(logits.ptr<float>(), bias ? bias->ptr<float>() : nullptr, m, int(e), int(k),
                      router_capacity(cfg, m, e), cfg.score == RouterScore::sigmoid,
                      cfg.normalize_topk, o.scores->ptr<float>(), o.expert->ptr<int32_t>(),
                      o.slot->ptr<int32_t>(), o.weight->ptr<float>(), o.counts->ptr<int32_t>(), ws,
                      sums, nullptr);
  if (o.loss_sums) return {};
  const Tensor view = Tensor::contiguous_view(sums, DType::f64, Device::cuda, {2}, "loss_sums");
  return router_losses(view, m, e, k);
}
#endif

template <typename T>
T logsumexp(const T* row, int64_t n) {
  T mx = row[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, row[j]);
  T s = T(0);
  for (int64_t j = 0; j < n; ++j) s += std::exp(row[j] - mx);
  return mx + std::log(s);
}

}  // namespace

int64_t router_capacity(const RouterConfig& cfg, int64_t tokens, int64_t experts) {
  if (cfg.capacity_factor <= 0) return tokens;
  const double cap =
      std::ceil(cfg.capacity_factor * double(tokens) * double(cfg.top_k) / double(experts));
  return std::min<int64_t>(tokens, static_cast<int64_t>(cap));
}

int64_t router_workspace_elems() {
#if defined(BRAID_WITH_CUDA)
  return router_loss_workspace_elems_cuda();
#else
  return 0;
#endif
}

RouterLosses router_losses(const Tensor& loss_sums, int64_t m, int64_t e, int64_t k) {
  BRAID_CHECK(
      loss_sums.device == Device::cuda && loss_sums.dtype == DType::f64 && loss_sums.numel() == 2,
      "router_losses: ", loss_sums.describe(), " must be f64 [2] on the GPU");
  double host[2] = {0, 0};
#if defined(BRAID_WITH_CUDA)
  CUDA_CHECK(cudaMemcpy(host, loss_sums.data, sizeof(host), cudaMemcpyDeviceToHost));
#endif
  return {host[0] * double(e) / (double(k) * double(m) * double(m)), host[1] / double(m)};
}

RouterLosses router_forward(const Tensor& logits, const Tensor* bias, const RouterConfig& cfg,
                            const RouterOutputs& o) {
  check_router(logits, cfg, o);
  if (logits.device == Device::cuda) {
#if defined(BRAID_WITH_CUDA)
    return router_forward_gpu(logits, bias, cfg, o);
#else
    BRAID_FAIL("moe_router: GPU tensors, but this build has no CUDA");
#endif
  }
  const int64_t m = logits.size(0), e = logits.size(1), k = cfg.top_k;
  if (bias)
    check_shape(*bias, {e}), check_same_dtype(logits, *bias), require_host("moe_router", {bias});
  RouterLosses losses;
  dispatch_float(logits.dtype, "moe_router", [&]<typename T>() {
    const T* lg = logits.ptr<T>();
    T *sc = o.scores->ptr<T>(), *wt = o.weight->ptr<T>();
    int32_t *ex = o.expert->ptr<int32_t>(), *sl = o.slot->ptr<int32_t>(),
            *cnt = o.counts->ptr<int32_t>();
    const T* bs = bias ? bias->ptr<T>() : nullptr;
    parallel_for(m, [&](int64_t i) {
      const T* row = lg + i * e;
      T* s = sc + i * e;
      if (cfg.score == RouterScore::softmax) {
        const T lse = logsumexp(row, e);
        for (int64_t j = 0; j < e; ++j) s[j] = std::exp(row[j] - lse);
      } else {
        for (int64_t j = 0; j < e; ++j) s[j] = sigmoid(row[j]);
      }
      // Top-k by s + bias: repeated arg-max, lower index first on ties.
      T total = T(0);
      for (int64_t kk = 0; kk < k; ++kk) {
        int64_t best = -1;
        T best_v = T(0);
        for (int64_t j = 0; j < e; ++j) {
          bool taken = false;
          for (int64_t q = 0; q < kk; ++q) taken = taken || ex[i * k + q] == j;
          if (taken) continue;
          const T v = s[j] + (bs ? bs[j] : T(0));
          if (best < 0 || v > best_v) best = j, best_v = v;
        }
        ex[i * k + kk] = static_cast<int32_t>(best);
        wt[i * k + kk] = s[best];
        total += s[best];
      }
      if (cfg.normalize_topk)
        for (int64_t kk = 0; kk < k; ++kk) wt[i * k + kk] /= total;
    });
    // Slots in (m, k) order: deterministic capacity dropping.
    const int64_t cap = router_capacity(cfg, m, e);
    for (int64_t j = 0; j < e; ++j) cnt[j] = 0;
    for (int64_t i = 0; i < m * k; ++i) {
      const int32_t j = ex[i];
      sl[i] = cnt[j] < cap ? cnt[j] : -1;
      ++cnt[j];
    }
    // Losses.
    double aux = 0, z = 0;
    for (int64_t i = 0; i < m; ++i) {
      const T* s = sc + i * e;
      T norm = T(1);
      if (cfg.score == RouterScore::sigmoid) {
        norm = T(0);
        for (int64_t j = 0; j < e; ++j) norm += s[j];
      }
      for (int64_t j = 0; j < e; ++j) aux += double(cnt[j]) * double(s[j] / norm);
      const double l = double(logsumexp(lg + i * e, e));
      z += l * l;
    }
    losses.aux = aux * double(e) / (double(k) * double(m) * double(m));
    losses.z = z / double(m);
  });
  return losses;
}

void router_backward(const Tensor& logits, const RouterConfig& cfg, const RouterOutputs& sv,
                     const Tensor& dweight, double aux_grad, double z_grad, const Tensor& dlogits) {
  check_router(logits, cfg, sv);
  const int64_t m = logits.size(0), e = logits.size(1), k = cfg.top_k;
  check_shape(dweight, {m, k});
  check_shape(dlogits, {m, e});
  if (logits.device == Device::cuda) {
    require_gpu("moe_router", {&dweight, &dlogits});
    require_dtype("moe_router", DType::f32, {&dweight, &dlogits});
#if defined(BRAID_WITH_CUDA)
    router_backward_cuda(logits.ptr<float>(), sv.scores->ptr<float>(), sv.expert->ptr<int32_t>(),
                         sv.counts->ptr<int32_t>(), dweight.ptr<float>(), m, int(e), int(k),
                         cfg.score == RouterScore::sigmoid, cfg.normalize_topk,
                         float(aux_grad * double(e) / (double(k) * double(m) * double(m))),
                         float(z_grad), dlogits.ptr<float>(), nullptr);
#endif
    return;
  }
  require_host("moe_router", {&dweight, &dlogits});
  dispatch_float(logits.dtype, "moe_router", [&]<typename T>() {
    const T *lg = logits.ptr<T>(), *sc = sv.scores->ptr<T>(), *gw = dweight.ptr<T>();
    const int32_t *ex = sv.expert->ptr<int32_t>(), *cnt = sv.counts->ptr<int32_t>();
    T* dl = dlogits.ptr<T>();
    const T aux_c = T(aux_grad * double(e) / (double(k) * double(m) * double(m)));
    parallel_for(m, [&](int64_t i) {
      const T* s = sc + i * e;
      T* g = dl + i * e;  // first holds d/ds, then d/dlogits
      for (int64_t j = 0; j < e; ++j) g[j] = T(0);
      // Top-k weights.
      T total = T(0), wdot = T(0);
      for (int64_t kk = 0; kk < k; ++kk) {
        total += s[ex[i * k + kk]];
        wdot += gw[i * k + kk] * s[ex[i * k + kk]];
      }
      for (int64_t kk = 0; kk < k; ++kk) {
        const int32_t j = ex[i * k + kk];
        g[j] +=
            cfg.normalize_topk ? gw[i * k + kk] / total - wdot / (total * total) : gw[i * k + kk];
      }
      // Auxiliary loss through pn = s / sum(s) (identity for softmax, where sum(s) = 1).
      if (cfg.score == RouterScore::sigmoid) {
        T ssum = T(0), pdot = T(0);
        for (int64_t j = 0; j < e; ++j) ssum += s[j], pdot += aux_c * T(cnt[j]) * s[j];
        for (int64_t j = 0; j < e; ++j) g[j] += aux_c * T(cnt[j]) / ssum - pdot / (ssum * ssum);
        for (int64_t j = 0; j < e; ++j) g[j] *= s[j] * (T(1) - s[j]);
      } else {
        for (int64_t j = 0; j < e; ++j) g[j] += aux_c * T(cnt[j]);
        T dot = T(0);
        for (int64_t j = 0; j < e; ++j) dot += g[j] * s[j];
        for (int64_t j = 0; j < e; ++j) g[j] = s[j] * (g[j] - dot);
      }
      // z-loss: d/dlogits of mean_m lse^2 = 2 lse softmax / M.
      const T* row = lg + i * e;
      const T lse = logsumexp(row, e);
      const T zc = T(z_grad) * T(2) * lse / T(m);
      for (int64_t j = 0; j < e; ++j) g[j] += zc * std::exp(row[j] - lse);
    });
  });
}

void router_update_bias(const Tensor& bias, const Tensor& counts, double rate) {
  const int64_t e = counts.numel();
  check_shape(bias, {e});
  BRAID_CHECK(counts.dtype == DType::i32, "router_update_bias: counts must be i32");
  if (bias.device == Device::cuda) {
    require_gpu("router_update_bias", {&bias, &counts});
    require_dtype("router_update_bias", DType::f32, {&bias});
#if defined(BRAID_WITH_CUDA)
    router_update_bias_cuda(bias.ptr<float>(), counts.ptr<int32_t>(), int(e), float(rate), nullptr);
#endif
    return;
  }
  require_host("router_update_bias", {&bias, &counts});
  int32_t* c = counts.ptr<int32_t>();
  double mean = 0;
  for (int64_t j = 0; j < e; ++j) mean += c[j];
  mean /= double(e);
  dispatch_float(bias.dtype, "router_update_bias", [&]<typename T>() {
    T* b = bias.ptr<T>();
    for (int64_t j = 0; j < e; ++j)
      b[j] += T(rate * (mean > c[j] ? 1.0 : mean < c[j] ? -1.0 : 0.0));
  });
  for (int64_t j = 0; j < e; ++j) c[j] = 0;
}

void router_accumulate_counts(const Tensor& acc, const Tensor& counts) {
  BRAID_CHECK(
      acc.dtype == DType::i32 && counts.dtype == DType::i32 && acc.numel() == counts.numel(),
      "router_accumulate_counts: i32 tensors of one size expected");
  if (acc.device == Device::cuda) {
    require_gpu("router_accumulate_counts", {&acc, &counts});
#if defined(BRAID_WITH_CUDA)
    router_accumulate_counts_cuda(acc.ptr<int32_t>(), counts.ptr<int32_t>(), int(acc.numel()),
                                  nullptr);
#endif
    return;
  }
  require_host("router_accumulate_counts", {&acc, &counts});
  for (int64_t j = 0; j < acc.numel(); ++j) acc.ptr<int32_t>()[j] += counts.ptr<int32_t>()[j];
}

}  // namespace braid
