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

// Every rank's [first doc, last doc] per row and one [B,C,W-1] array, all-gathered.
std::vector<double> gather(const Conv1dInputs& in, const Dims& d, const std::vector<double>& halo,
                           Communicator& cp) {
  std::vector<double> mine;
  for (int64_t b = 0; b < d.b; ++b) mine.push_back(doc(in, d, b, 0));
  for (int64_t b = 0; b < d.b; ++b) mine.push_back(doc(in, d, b, d.t - 1));
  mine.insert(mine.end(), halo.begin(), halo.end());
  std::vector<double> all(mine.size() * cp.size());
  cp.all_gather(
      Tensor::contiguous_view(mine.data(), DType::f64, Device::cpu, {int64_t(mine.size())}, "halo"),
      Tensor::contiguous_view(all.data(), DType::f64, Device::cpu, {int64_t(all.size())}, "halos"));
  return all;
}

// Rank q's part of a gather: 2 B document ids, then the array.
const double* part(const std::vector<double>& all, const Dims& d, int q) {
  return all.data() + size_t(q) * (2 * d.b + d.b * d.c * d.h);
}
// Does shard q's last token's document continue at shard q + 1's first token, in row b?
bool continues(const std::vector<double>& all, const Dims& d, int q, int64_t b) {
  return part(all, d, q)[d.b + b] == part(all, d, q + 1)[b];
}

// The initial state of this rank's shard: the previous shard's halo where its document goes on.
std::vector<double> initial_state(const Conv1dInputs& in, const Dims& d, Communicator& cp) {
  std::vector<double> halo(d.b * d.c * d.h, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t j = 0; j < d.h; ++j) {
      const int64_t t = d.t - d.h + j;
      if (doc(in, d, b, t) != doc(in, d, b, d.t - 1)) continue;
      for (int64_t c = 0; c < d.c; ++c)
        halo[(b * d.c + c) * d.h + j] = host_value(*in.x, (b * d.t + t) * d.c + c);
    }
  const std::vector<double> all = gather(in, d, halo, cp);
  const int r = cp.rank();
  if (r == 0) return in.initial_state ? host_values(*in.initial_state) : std::vector<double>{};
  std::vector<double> init(d.b * d.c * d.h, 0.0);
  const double* prev = part(all, d, r - 1) + 2 * d.b;
  for (int64_t i = 0; i < int64_t(init.size()); ++i)
    if (continues(all, d, r - 1, i / (d.c * d.h))) init[i] = prev[i];
  return init;
}

}  // namespace

void causal_conv1d_forward_cp(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state,
                              Communicator& cp) {
  const Dims d = check_cp(in);
  const std::vector<double> init = initial_state(in, d, cp);
  const HostBuffer h0(in.x->dtype, {d.b, d.c, d.h}, init);
  Conv1dInputs from = in;
  from.initial_state = init.empty() ? nullptr : &h0.t;
  causal_conv1d_forward(from, y, final_state);
}

void causal_conv1d_backward_cp(const Conv1dInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                               const Conv1dGrads& grads, Communicator& cp) {
  const Dims d = check_cp(in);
  const std::vector<double> init = initial_state(in, d, cp);
  const HostBuffer h0(in.x->dtype, {d.b, d.c, d.h}, init);
  Conv1dInputs from = in;
  from.initial_state = init.empty() ? nullptr : &h0.t;
  const int r = cp.rank(), last = cp.size() - 1;
  // This shard's gradients (the halo it sent has not been credited yet), and that of its
  // initial state, which belongs to the previous shard's last inputs.
  const HostBuffer g0(in.x->dtype, {d.b, d.c, d.h});
  Conv1dGrads mine = grads;
  mine.dinitial_state = &g0.t;
  causal_conv1d_backward(from, dy, r == last ? dfinal_state : nullptr, mine);
  const std::vector<double> g = host_values(g0.t);
  for (int64_t i = 0; grads.dinitial_state && i < int64_t(g.size()); ++i)
    set_host_value(*grads.dinitial_state, i, g[i]);
  const std::vector<double> all = gather(in, d, g, cp);
  if (r == last || !grads.dx) return;
  // The next shard's initial-state gradient, onto this shard's last inputs (where they were
  // sent: the same document as the last token, which the next shard continues).
  const double* next = part(all, d, r + 1) + 2 * d.b;
  for (int64_t b = 0; b < d.b; ++b) {
    if (!continues(all, d, r, b)) continue;
    for (int64_t j = 0; j < d.h; ++j) {
      const int64_t t = d.t - d.h + j;
      if (doc(in, d, b, t) != doc(in, d, b, d.t - 1)) continue;
      for (int64_t c = 0; c < d.c; ++c) {
        const int64_t i = (b * d.t + t) * d.c + c;
        set_host_value(*grads.dx, i, host_value(*grads.dx, i) + next[(b * d.c + c) * d.h + j]);
      }
    }
  }
}

}  // namespace braid
