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
  BRAID_CHECK(in.x->is_contiguous(), "causal_conv1d (context parallel): ", in.x->describe(),
              " must be contiguous");
  return d;
}

// Row b's last W-1 tokens of a [B,T,C] tensor (contiguous), as a [W-1, C] view.
Tensor halo_rows(const Tensor& x, const Dims& d, int64_t b) {
  return Tensor::contiguous_view(
      static_cast<char*>(x.data) + ((b * d.t + d.t - d.h) * d.c) * dtype_size(x.dtype), x.dtype,
      x.device, {d.h, d.c}, "halo");
}

// The halo is a state map with no decay: h_in(r + 1) = halo(r) where the document goes on. So the
// shards' halos (or, backward, their initial states' gradients) pass through state_passing.h.
StatePassing pass(const Conv1dInputs& in, const Dims& d, const std::vector<int32_t>& seq,
                  std::vector<double> state, Communicator& cp) {
  ShardMap m;
  std::vector<bool> starts_inside;
  shard_documents(seq.empty() ? nullptr : seq.data(), d.b, d.t, m, starts_inside);
  m.decay.assign(d.b * d.c * d.h, 0.0);
  m.state = std::move(state);
  return StatePassing(m, d.c * d.h, cp, in.x->device, in.stream);
}

// Whether position t of row b is in the document of the row's last token.
bool in_last_document(const std::vector<int32_t>& seq, const Dims& d, int64_t b, int64_t t) {
  return seq.empty() || seq[b * d.t + t] == seq[b * d.t + d.t - 1];
}

// The initial state of this rank's shard: the previous shard's last W-1 inputs (those in the
// document of its last token) where that document goes on; the sequence's on rank 0.
std::vector<double> initial_state(const Conv1dInputs& in, const Dims& d,
                                  const std::vector<int32_t>& seq, Communicator& cp) {
  std::vector<double> halo(d.b * d.c * d.h, 0.0);
  for (int64_t b = 0; b < d.b; ++b) {
    const std::vector<double> rows = tensor_values(halo_rows(*in.x, d, b), in.stream);
    for (int64_t j = 0; j < d.h; ++j) {
      if (!in_last_document(seq, d, b, d.t - d.h + j)) continue;
      for (int64_t c = 0; c < d.c; ++c) halo[(b * d.c + c) * d.h + j] = rows[j * d.c + c];
    }
  }
  return pass(in, d, seq, std::move(halo), cp)
      .entering_state(in.initial_state ? tensor_values(*in.initial_state, in.stream)
                                       : std::vector<double>{});
}

}  // namespace

void causal_conv1d_forward_cp(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state,
                              Communicator& cp) {
  const Dims d = check_cp(in);
  const ScratchTensor h0(in.x->dtype, {d.b, d.c, d.h}, in.x->device, in.stream);
  set_tensor_values(h0.t, initial_state(in, d, host_documents(in.seq_idx, in.stream), cp),
                    in.stream);
  Conv1dInputs from = in;
  from.initial_state = &h0.t;
  causal_conv1d_forward(from, y, final_state);
}

void causal_conv1d_backward_cp(const Conv1dInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                               const Conv1dGrads& grads, Communicator& cp,
                               const Tensor* workspace) {
  const Dims d = check_cp(in);
  const std::vector<int32_t> seq = host_documents(in.seq_idx, in.stream);
  const ScratchTensor h0(in.x->dtype, {d.b, d.c, d.h}, in.x->device, in.stream);
  set_tensor_values(h0.t, initial_state(in, d, seq, cp), in.stream);
  Conv1dInputs from = in;
  from.initial_state = &h0.t;
  const int r = cp.rank(), last = cp.size() - 1;
  // This shard's gradients, and that of its initial state, which belongs to the previous
  // shard's last inputs.
  const ScratchTensor g0(in.x->dtype, {d.b, d.c, d.h}, in.x->device, in.stream);
  Conv1dGrads mine = grads;
  mine.dinitial_state = &g0.t;
  causal_conv1d_backward(from, dy, r == last ? dfinal_state : nullptr, mine, workspace);
  const std::vector<double> g = tensor_values(g0.t, in.stream);
  if (grads.dinitial_state) set_tensor_values(*grads.dinitial_state, g, in.stream);
  // The next shard's initial-state gradient (0 where its document does not go on), onto the
  // last inputs this shard sent it.
  const std::vector<double> next = pass(in, d, seq, g, cp).arriving_grad();
  if (r == last || !grads.dx) return;
  BRAID_CHECK(grads.dx->is_contiguous(), "causal_conv1d (context parallel): ", grads.dx->describe(),
              " must be contiguous");
  for (int64_t b = 0; b < d.b; ++b) {
    const Tensor rows = halo_rows(*grads.dx, d, b);
    std::vector<double> v = tensor_values(rows, in.stream);
    for (int64_t j = 0; j < d.h; ++j) {
      if (!in_last_document(seq, d, b, d.t - d.h + j)) continue;
      for (int64_t c = 0; c < d.c; ++c) v[j * d.c + c] += next[(b * d.c + c) * d.h + j];
    }
    set_tensor_values(rows, v, in.stream);
  }
}

}  // namespace braid
