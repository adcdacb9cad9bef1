#include "layers/selective_scan/selective_scan_cp.h"

#include <deque>

#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

// The shard's decay exp(A_c,n sum_t dt_t) per (row, channel, state).
ShardDecay shard_decay(const ScanInputs& in) {
  selective_scan_dims(in);  // checks the shapes
  return {in.delta, in.delta_bias, in.A, in.delta_softplus};
}

}  // namespace

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& entering, const Tensor& workspace, Communicator& cp) {
  const ShardDecay decay = shard_decay(in);
  ScanInputs from = in;
  from.initial_state = nullptr;
  selective_scan_forward(from, y, &entering, &workspace);  // H: the final state from zero
  shard_entering_state(&decay, in.seq_idx, entering, in.initial_state, entering, cp, in.stream);
  from.initial_state = &entering;
  selective_scan_forward(from, y, final_state, &workspace);
}

void selective_scan_backward_cp(const ScanInputs& in, const Tensor& entering, const Tensor& dy,
                                const Tensor* dfinal_state, const ScanGrads& grads,
                                const Tensor& workspace, Communicator& cp) {
  const ShardDecay decay = shard_decay(in);
  void* st = in.stream;
  ScanInputs from = in;
  from.initial_state = &entering;
  // 1. Back through this shard with nothing arriving at its end: G, the gradient of the entering
  //    state. The other gradients of this pass go to scratch (dA, dD, ddelta_bias accumulate).
  std::deque<ScratchTensor> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t, st); };
  const Tensor* g = like(&entering);
  selective_scan_backward(
      from, dy, nullptr,
      {like(grads.du), like(grads.ddelta), like(grads.dA), like(grads.dB), like(grads.dC),
       like(grads.dD), like(grads.dz), like(grads.ddelta_bias), g},
      workspace);
  // 2. The gradient arriving at this shard's end; 3. back again with it: every gradient exact.
  shard_arriving_grad(&decay, in.seq_idx, *g, dfinal_state, *g, cp, st);
  selective_scan_backward(from, dy, g, grads, workspace);
}

}  // namespace braid
