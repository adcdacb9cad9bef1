// Context-parallel SSD by state passing (layers/common/state_passing.h): the cp ranks hold
// consecutive shards of every sequence; a shard's map is h_out = P h_in + H with P = exp(A sum_t
// dt_t) per (row, head) (0 where a document starts inside the shard) and H its final state from
// zero. Forward: scan from zero, fold the earlier shards' maps into the entering state, scan again
// from it. Backward: back with no gradient at the end (G, the entering state's gradient), fold the
// later shards' maps into the gradient arriving at the end, back again with it: exact gradients,
// [B,H,P,N] states the only traffic. Inputs as for ssd_forward: initial_state is the sequence's
// (rank 0), final_state gets the state leaving this shard (the sequence's on the last rank),
// dfinal_state is read on the last rank, dinitial_state gets the gradient of the state entering
// this shard. The backward also takes a forward workspace (it recomputes the entering state).
// CPU tensors over any cp group, or GPU tensors over an NCCL cp group: the maps are then folded in
// f64 on the host (copied there and back; the states passed are f32), the scratch comes from
// CUDA's stream-ordered pool, and the backward runs the shard's forward from its entering state
// once more, since the GPU backward reads what that forward leaves in the workspace.
#pragma once

#include "layers/ssd/ssd.h"
#include "parallel/communicator.h"

namespace braid {

void ssd_forward_cp(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                    const Tensor& workspace, Communicator& cp);
void ssd_backward_cp(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                     const SsdGrads& grads, const Tensor& forward_workspace,
                     const Tensor& workspace, Communicator& cp);

}  // namespace braid
