// Context-parallel selective scan by state passing (layers/common/state_passing.h): the cp ranks
// hold consecutive shards of every sequence, and only [B,C,N] states cross ranks, however long
// the sequence. A shard's map is h_out = P h_in + H (P = exp(A sum_t dt_t) per (row, channel,
// state), 0 where a document starts inside the shard; H = its final state from zero):
//   forward   scan from zero (H); fold the earlier shards' maps into the entering state (0 across
//             a document that starts at this shard's first token); scan again from it (y, h_out);
//   backward  from the entering state the forward saved (and on the GPU the chunk states it left
//             in the workspace): back with no gradient at h_out (G, the entering state's
//             gradient); fold the later shards' maps into the gradient arriving at h_out; back
//             again with it: exact.
// Each direction runs the scan twice: the price of a communication independent of T.
// ScanInputs as for selective_scan_forward: initial_state is the sequence's (used by rank 0),
// final_state gets the state leaving this rank's shard (the sequence's on the last rank),
// dfinal_state is the gradient at the sequence's end (read on the last rank), and dinitial_state
// gets the gradient of the state entering this shard (the sequence's on rank 0). entering
// [B,C,N] (f32 on the GPU, the inputs' dtype on the CPU) gets the state entering this shard; the
// backward reads it. CPU tensors over any cp group, or GPU tensors over an NCCL cp group, whose
// maps never leave the device.
#pragma once

#include "layers/selective_scan/selective_scan.h"
#include "parallel/communicator.h"

namespace braid {

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& entering, const Tensor& workspace, Communicator& cp);
// workspace: on the GPU the one selective_scan_forward_cp wrote (its chunk states); on the CPU
// the backward's scratch.
void selective_scan_backward_cp(const ScanInputs& in, const Tensor& entering, const Tensor& dy,
                                const Tensor* dfinal_state, const ScanGrads& grads,
                                const Tensor& workspace, Communicator& cp);

}  // namespace braid
