#include "layers/selective_scan/selective_scan_cp.h"

#include <cmath>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

double get(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
}
std::vector<double> values(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = get(t, i);
  return v;
}

// Host storage of the activations' dtype.
struct Host {
  std::vector<double> storage;
  Tensor t;
  Host(DType dtype, std::vector<int64_t> shape, const std::vector<double>& v = {}) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    storage.assign(n, 0.0);
    t = Tensor::contiguous_view(storage.data(), dtype, Device::cpu, shape, "cp_state");
    for (int64_t i = 0; i < int64_t(v.size()); ++i)
      if (dtype == DType::f64)
        t.ptr<double>()[i] = v[i];
      else
        t.ptr<float>()[i] = float(v[i]);
  }
};

// This shard's decay per (b, c, n): exp(A sum_t dt_t), 0 where a document starts inside it.
ShardMap shard_map(const ScanInputs& in, const ScanDims& d) {
  ShardMap m;
  std::vector<bool> starts;
  shard_documents(in.seq_idx ? in.seq_idx->data : nullptr, d.b, d.t, m, starts);
  m.decay.assign(d.b * d.c * d.n, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t c = 0; c < d.c && !starts[b]; ++c) {
      double sum = 0;
      for (int64_t t = 0; t < d.t; ++t) {
        double x = get(*in.delta, (b * d.t + t) * d.c + c) +
                   (in.delta_bias ? get(*in.delta_bias, c) : 0.0);
        sum += in.delta_softplus ? (x > 20 ? x : std::log1p(std::exp(x))) : x;
      }
      for (int64_t n = 0; n < d.n; ++n)
        m.decay[(b * d.c + c) * d.n + n] = std::exp(sum * get(*in.A, c * d.n + n));
    }
  return m;
}

// The state entering this rank's shard (forward steps 1-2 of the header).
std::vector<double> entering(const ScanInputs& in, const ScanDims& d, const Tensor& y_scratch,
                             const Tensor& workspace, Communicator& cp) {
  require_host("selective_scan (context parallel)",
               {in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.delta_bias, in.seq_idx});
  ScanInputs zero = in;
  zero.initial_state = nullptr;
  Host h_loc(in.u->dtype, {d.b, d.c, d.n});
  selective_scan_forward(zero, y_scratch, &h_loc.t, &workspace);
  ShardMap m = shard_map(in, d);
  m.state = values(h_loc.t);
  const StatePassing sp(m, d.c * d.n, cp);
  return sp.entering_state(in.initial_state ? values(*in.initial_state) : std::vector<double>{});
}

}  // namespace

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const Host h_in(in.u->dtype, {d.b, d.c, d.n}, entering(in, d, y, workspace, cp));
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  selective_scan_forward(from, y, final_state, &workspace);
}

void selective_scan_backward_cp(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                const ScanGrads& grads, const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const Host y_tmp(in.u->dtype, {d.b, d.t, d.c});
  const Host h_in(in.u->dtype, {d.b, d.c, d.n}, entering(in, d, y_tmp.t, workspace, cp));
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  // 1. Back through this shard with nothing arriving at its end: G, the gradient of h_in. The
  //    other gradients of this pass go to scratch (dA, dD, ddelta_bias accumulate).
  std::vector<Host> scratch;
  scratch.reserve(8);
  auto like = [&](const Tensor* t) -> const Tensor* {
    if (!t) return nullptr;
    scratch.emplace_back(t->dtype,
                         std::vector<int64_t>(t->shape.begin(), t->shape.begin() + t->ndim));
    return &scratch.back().t;
  };
  const Host g_loc(in.u->dtype, {d.b, d.c, d.n});
  selective_scan_backward(
      from, dy, nullptr,
      {like(grads.du), like(grads.ddelta), like(grads.dA), like(grads.dB), like(grads.dC),
       like(grads.dD), like(grads.dz), like(grads.ddelta_bias), &g_loc.t},
      workspace);
  // 2. The gradient arriving at this shard's end; 3. back again with it: every gradient exact.
  ShardMap m = shard_map(in, d);
  m.state = values(g_loc.t);
  if (dfinal_state && cp.rank() == cp.size() - 1) m.extra = values(*dfinal_state);
  const Host g_out(in.u->dtype, {d.b, d.c, d.n}, StatePassing(m, d.c * d.n, cp).arriving_grad());
  selective_scan_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
