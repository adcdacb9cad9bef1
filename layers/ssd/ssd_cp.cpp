#include "layers/ssd/ssd_cp.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

struct Dims {
  int64_t b, t, h, p, n;
};
Dims dims_of(const SsdInputs& in) {
  BRAID_CHECK(in.x && in.dt && in.A && in.B && in.x->ndim == 4 && in.B->ndim == 4,
              "ssd (context parallel): expects x [B,T,H,P], dt, A, B [B,T,G,N]");
  return {in.x->size(0), in.x->size(1), in.x->size(2), in.x->size(3), in.B->size(3)};
}

// This shard's decay, exp(A_h sum_t dt_t) for every (p, n) of head h, 0 where a document starts
// inside it.
ShardMap shard_map(const SsdInputs& in, const Dims& d) {
  ShardMap m;
  std::vector<bool> starts;
  shard_documents(in.seq_idx ? in.seq_idx->data : nullptr, d.b, d.t, m, starts);
  const int64_t pn = d.p * d.n;
  m.decay.assign(d.b * d.h * pn, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t h = 0; h < d.h && !starts[b]; ++h) {
      double sum = 0;
      for (int64_t t = 0; t < d.t; ++t) {
        double x = host_value(*in.dt, (b * d.t + t) * d.h + h) +
                   (in.dt_bias ? host_value(*in.dt_bias, h) : 0.0);
        if (in.dt_softplus) x = x > 20 ? x : std::log1p(std::exp(x));
        sum += std::min(std::max(x, in.dt_min), in.dt_max);
      }
      std::fill_n(m.decay.begin() + (b * d.h + h) * pn, pn, std::exp(sum * host_value(*in.A, h)));
    }
  return m;
}

std::vector<double> entering(const SsdInputs& in, const Dims& d, const Tensor& y_scratch,
                             const Tensor& workspace, Communicator& cp) {
  require_host("ssd (context parallel)",
               {in.x, in.dt, in.A, in.B, in.C, in.D, in.dt_bias, in.seq_idx});
  SsdInputs zero = in;
  zero.initial_state = nullptr;
  HostBuffer h_loc(in.x->dtype, {d.b, d.h, d.p, d.n});
  ssd_forward(zero, y_scratch, &h_loc.t, workspace);
  ShardMap m = shard_map(in, d);
  m.state = host_values(h_loc.t);
  const StatePassing sp(m, d.h * d.p * d.n, cp);
  return sp.entering_state(in.initial_state ? host_values(*in.initial_state)
                                            : std::vector<double>{});
}

}  // namespace

void ssd_forward_cp(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                    const Tensor& workspace, Communicator& cp) {
  const Dims d = dims_of(in);
  const HostBuffer h_in(in.x->dtype, {d.b, d.h, d.p, d.n}, entering(in, d, y, workspace, cp));
  SsdInputs from = in;
  from.initial_state = &h_in.t;
  ssd_forward(from, y, final_state, workspace);
}

void ssd_backward_cp(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                     const SsdGrads& grads, const Tensor& forward_workspace,
                     const Tensor& workspace, Communicator& cp) {
  const Dims d = dims_of(in);
  const HostBuffer y_tmp(in.x->dtype, {d.b, d.t, d.h, d.p});
  const HostBuffer h_in(in.x->dtype, {d.b, d.h, d.p, d.n},
                        entering(in, d, y_tmp.t, forward_workspace, cp));
  SsdInputs from = in;
  from.initial_state = &h_in.t;
  std::deque<HostBuffer> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t); };

  const HostBuffer g_loc(in.x->dtype, {d.b, d.h, d.p, d.n});
  ssd_backward(from, dy, nullptr,
               {like(grads.dx), like(grads.ddt), like(grads.dA), like(grads.dB), like(grads.dC),
                like(grads.dD), like(grads.ddt_bias), &g_loc.t},
               workspace);
  ShardMap m = shard_map(in, d);
  m.state = host_values(g_loc.t);
  if (dfinal_state && cp.rank() == cp.size() - 1) m.extra = host_values(*dfinal_state);
  const HostBuffer g_out(in.x->dtype, {d.b, d.h, d.p, d.n},
                         StatePassing(m, d.h * d.p * d.n, cp).arriving_grad());
  ssd_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
