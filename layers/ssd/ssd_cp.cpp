#include "layers/ssd/ssd_cp.h"

#include <deque>

#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

// The shard's decay exp(A_h sum_t dt_t) per (row, head), over the P N state elements of the head.
ShardDecay shard_decay(const SsdInputs& in) {
  BRAID_CHECK(in.x && in.dt && in.A && in.B && in.x->ndim == 4 && in.B->ndim == 4,
              "ssd (context parallel): expects x [B,T,H,P], dt, A, B [B,T,G,N]");
  return {in.dt, in.dt_bias, in.A, in.dt_softplus, in.dt_min, in.dt_max};
}

}  // namespace

void ssd_forward_cp(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                    const Tensor& entering, const Tensor& workspace, Communicator& cp) {
  const ShardDecay decay = shard_decay(in);
  SsdInputs from = in;
  from.initial_state = nullptr, from.y_scan = nullptr;
  ssd_forward(from, y, &entering, workspace);  // H: this shard's final state from zero
  shard_entering_state(&decay, in.seq_idx, entering, in.initial_state, entering, cp, in.stream);
  from = in;
  from.initial_state = &entering;
  ssd_forward(from, y, final_state, workspace);
}

void ssd_backward_cp(const SsdInputs& in, const Tensor& entering, const Tensor& dy,
                     const Tensor* dfinal_state, const SsdGrads& grads, const Tensor& workspace,
                     Communicator& cp) {
  const ShardDecay decay = shard_decay(in);
  void* st = in.stream;
  SsdInputs from = in;
  from.initial_state = &entering;
  // G, the entering state's gradient alone; then the gradient arriving at the end; then the
  // whole backward with it.
  std::deque<ScratchTensor> keep;
  const Tensor& g = *scratch_like(keep, &entering, st);
  ssd_initial_state_grad(from, dy, nullptr, g, workspace);
  shard_arriving_grad(&decay, in.seq_idx, g, dfinal_state, g, cp, st);
  ssd_backward(from, dy, &g, grads, workspace);
}

}  // namespace braid
