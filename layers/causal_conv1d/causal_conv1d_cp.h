// Context-parallel causal conv1d: the cp ranks hold consecutive shards of every sequence (each at
// least W-1 tokens long), and only the halo crosses ranks: the last W-1 inputs of a shard (0 where
// they belong to another document than its last token) are the next shard's initial state when
// that shard's first token continues the document (else zeros), and in backward the gradient of
// a shard's initial state goes back to the previous shard's last inputs. Every rank's halo and
// edge document ids are all-gathered (B C (W-1) values each). Inputs as for
// causal_conv1d_forward: initial_state is the sequence's (rank 0), final_state gets this shard's,
// dfinal_state is read on the last rank, dinitial_state gets the gradient of this shard's initial
// state (the sequence's on rank 0). entering [B,C,W-1] (x's dtype) gets this shard's initial state
// in the forward, and the backward reads it there (no second exchange). CPU tensors over any cp
// group, or GPU tensors over an NCCL cp group (the halos stay on the device; the GPU backward
// takes its workspace).
#pragma once

#include "layers/causal_conv1d/causal_conv1d.h"
#include "parallel/communicator.h"

namespace braid {

void causal_conv1d_forward_cp(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state,
                              const Tensor& entering, Communicator& cp);
void causal_conv1d_backward_cp(const Conv1dInputs& in, const Tensor& entering, const Tensor& dy,
                               const Tensor* dfinal_state, const Conv1dGrads& grads,
                               Communicator& cp, const Tensor* workspace = nullptr);

}  // namespace braid
