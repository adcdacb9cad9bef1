#include "layers/selective_scan/selective_scan_cp.h"

#include <cmath>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

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
        double x = host_value(*in.delta, (b * d.t + t) * d.c + c) +
                   (in.delta_bias ? host_value(*in.delta_bias, c) : 0.0);
        sum += in.delta_softplus ? (x > 20 ? x : std::log1p(std::exp(x))) : x;
      }
      for (int64_t n = 0; n < d.n; ++n)
        m.decay[(b * d.c + c) * d.n + n] = std::exp(sum * host_value(*in.A, c * d.n + n));
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
  HostBuffer h_loc(in.u->dtype, {d.b, d.c, d.n});
  selective_scan_forward(zero, y_scratch, &h_loc.t, &workspace);
  ShardMap m = shard_map(in, d);
  m.state = host_values(h_loc.t);
  const StatePassing sp(m, d.c * d.n, cp);
  return sp.entering_state(in.initial_state ? host_values(*in.initial_state)
                                            : std::vector<double>{});
}

}  // namespace

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const HostBuffer h_in(in.u->dtype, {d.b, d.c, d.n}, entering(in, d, y, workspace, cp));
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  selective_scan_forward(from, y, final_state, &workspace);
}

void selective_scan_backward_cp(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                const ScanGrads& grads, const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const HostBuffer y_tmp(in.u->dtype, {d.b, d.t, d.c});
  const HostBuffer h_in(in.u->dtype, {d.b, d.c, d.n}, entering(in, d, y_tmp.t, workspace, cp));
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  // 1. Back through this shard with nothing arriving at its end: G, the gradient of h_in. The
  //    other gradients of this pass go to scratch (dA, dD, ddelta_bias accumulate).
  std::deque<HostBuffer> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t); };

  const HostBuffer g_loc(in.u->dtype, {d.b, d.c, d.n});
  selective_scan_backward(
      from, dy, nullptr,
      {like(grads.du), like(grads.ddelta), like(grads.dA), like(grads.dB), like(grads.dC),
       like(grads.dD), like(grads.dz), like(grads.ddelta_bias), &g_loc.t},
      workspace);
  // 2. The gradient arriving at this shard's end; 3. back again with it: every gradient exact.
  ShardMap m = shard_map(in, d);
  m.state = host_values(g_loc.t);
  if (dfinal_state && cp.rank() == cp.size() - 1) m.extra = host_values(*dfinal_state);
  const HostBuffer g_out(in.u->dtype, {d.b, d.c, d.n},
                         StatePassing(m, d.c * d.n, cp).arriving_grad());
  selective_scan_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
