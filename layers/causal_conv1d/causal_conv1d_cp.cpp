#include "layers/causal_conv1d/causal_conv1d_cp.h"

#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

struct Dims {
  int64_t b, t, c, h;  // h = W - 1 halo positions
};

Dims check_cp(const Conv1dInputs& in) {
  BRAID_CHECK(in.x && in.w && in.x->ndim == 3 && in.w->ndim == 2,
              "causal_conv1d (context parallel): expects x [B,T,C] and w [C,W]");
  const Dims d{in.x->size(0), in.x->size(1), in.x->size(2), in.w->size(1) - 1};
  BRAID_REQUIRE(d.t >= d.h, "causal_conv1d (context parallel): a shard of ", d.t,
                " tokens is shorter than the conv's ", d.h, "-token halo");
  require_host("causal_conv1d (context parallel)", {in.x, in.w, in.bias, in.seq_idx});
  return d;
}

int32_t doc(const Conv1dInputs& in, const Dims& d, int64_t b, int64_t t) {
  return in.seq_idx ? in.seq_idx->ptr<int32_t>()[b * d.t + t] : 0;
}

// The halo is a state map with no decay: h_in(r + 1) = halo(r) where the document goes on. So the
// shards' halos (or, backward, their initial states' gradients) pass through state_passing.h.
StatePassing pass(const Conv1dInputs& in, const Dims& d, std::vector<double> state,
                  Communicator& cp) {
  ShardMap m;
  std::vector<bool> starts_inside;
  shard_documents(in.seq_idx ? in.seq_idx->data : nullptr, d.b, d.t, m, starts_inside);
  m.decay.assign(d.b * d.c * d.h, 0.0);
  m.state = std::move(state);
  return StatePassing(m, d.c * d.h, cp);
}

// The initial state of this rank's shard: the previous shard's last W-1 inputs (those in the
// document of its last token) where that document goes on; the sequence's on rank 0.
std::vector<double> initial_state(const Conv1dInputs& in, const Dims& d, Communicator& cp) {
  std::vector<double> halo(d.b * d.c * d.h, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t j = 0; j < d.h; ++j) {
      const int64_t t = d.t - d.h + j;
      if (doc(in, d, b, t) != doc(in, d, b, d.t - 1)) continue;
      for (int64_t c = 0; c < d.c; ++c)
        halo[(b * d.c + c) * d.h + j] = host_value(*in.x, (b * d.t + t) * d.c + c);
    }
  return pass(in, d, std::move(halo), cp)
      .entering_state(in.initial_state ? host_values(*in.initial_state) : std::vector<double>{});
}

}  // namespace

void causal_conv1d_forward_cp(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state,
                              Communicator& cp) {
  const Dims d = check_cp(in);
  const HostBuffer h0(in.x->dtype, {d.b, d.c, d.h}, initial_state(in, d, cp));
  Conv1dInputs from = in;
  from.initial_state = &h0.t;
  causal_conv1d_forward(from, y, final_state);
}

void causal_conv1d_backward_cp(const Conv1dInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                               const Conv1dGrads& grads, Communicator& cp) {
  const Dims d = check_cp(in);
  const HostBuffer h0(in.x->dtype, {d.b, d.c, d.h}, initial_state(in, d, cp));
  Conv1dInputs from = in;
  from.initial_state = &h0.t;
  const int r = cp.rank(), last = cp.size() - 1;
  // This shard's gradients, and that of its initial state, which belongs to the previous
  // shard's last inputs.
  const HostBuffer g0(in.x->dtype, {d.b, d.c, d.h});
  Conv1dGrads mine = grads;
  mine.dinitial_state = &g0.t;
  causal_conv1d_backward(from, dy, r == last ? dfinal_state : nullptr, mine);
  const std::vector<double> g = host_values(g0.t);
  for (int64_t i = 0; grads.dinitial_state && i < int64_t(g.size()); ++i)
    set_host_value(*grads.dinitial_state, i, g[i]);
  // The next shard's initial-state gradient (0 where its document does not go on), onto the
  // last inputs this shard sent it.
  const std::vector<double> next = pass(in, d, g, cp).arriving_grad();
  if (r == last || !grads.dx) return;
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t j = 0; j < d.h; ++j) {
      const int64_t t = d.t - d.h + j;
      if (doc(in, d, b, t) != doc(in, d, b, d.t - 1)) continue;
      for (int64_t c = 0; c < d.c; ++c) {
        const int64_t i = (b * d.t + t) * d.c + c;
        set_host_value(*grads.dx, i, host_value(*grads.dx, i) + next[(b * d.c + c) * d.h + j]);
      }
    }
}

}  // namespace braid
