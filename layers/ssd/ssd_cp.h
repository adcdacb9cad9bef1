// Context-parallel SSD by state passing (layers/common/state_passing.h): the cp ranks hold
// consecutive shards of every sequence; a shard's map is h_out = P h_in + H with P = exp(A sum_t
// dt_t) per (row, head) (0 where a document starts inside the shard) and H its final state from
// zero. Forward: scan from zero, fold the earlier shards' maps into the entering state, scan again
// from it. Backward (from the entering state the forward saved, and on the GPU the workspace it
// left): the entering state's gradient with no gradient at the end (G: on GPUs the state-gradient
// pass alone, ssd_initial_state_grad), fold the later shards' maps into the gradient arriving at
// the end, back with it: exact gradients, [B,H,P,N] states the only traffic; two forward scans
// and a backward and a state-gradient pass a step, where one GPU runs a forward and a backward.
// Inputs as for ssd_forward: initial_state is the sequence's (rank 0), final_state gets the state
// leaving this shard (the sequence's on the last rank), dfinal_state is read on the last rank,
// dinitial_state gets the gradient of the state entering this shard. entering [B,H,P,N] (f32 on the
// GPU, the inputs' dtype on the CPU) gets the state entering this shard; the backward reads it. CPU
// tensors over any cp group, or GPU tensors over an NCCL cp group, whose maps never leave the
// device.
#pragma once

#include "layers/ssd/ssd.h"
#include "parallel/communicator.h"

namespace braid {

void ssd_forward_cp(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                    const Tensor& entering, const Tensor& workspace, Communicator& cp);
// workspace: on the GPU the one ssd_forward_cp wrote (it holds the scan from `entering`); on the
// CPU the backward's scratch, as ssd_backward's.
void ssd_backward_cp(const SsdInputs& in, const Tensor& entering, const Tensor& dy,
                     const Tensor* dfinal_state, const SsdGrads& grads, const Tensor& workspace,
                     Communicator& cp);

}  // namespace braid
