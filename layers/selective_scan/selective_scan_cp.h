// Context-parallel selective scan by state passing: the cp ranks hold consecutive shards of the
// sequence (rank r: tokens [r T_r, (r+1) T_r) of every row, T_r = this rank's length), and only
// [B,C,N] states cross ranks, however long the sequence. The state leaving a shard is an affine
// function of the state entering it, h_out = P h_in + H (P = prod_t exp(dt_t A), or 0 where a
// document starts inside the shard; H = the final state of the shard scanned from zero), so:
//   forward   scan from zero (H); all-gather (P, H) and the rows' document ids at the shard
//             edges; h_in = fold of the earlier shards' maps (0 where a document starts at this
//             shard's first token); scan again from h_in (y, h_out);
//   backward  scan back with no gradient arriving at h_out: the gradient of h_in through this
//             shard's outputs (G); all-gather (P, G); the gradient arriving at h_out = the fold of
//             the later shards' maps g_r = G_{r+1} + P_{r+1} g_{r+1} (0 across a document start);
//             scan back again with it: every gradient exact.
// Each direction runs the scan twice: the price of a communication independent of T.
// ScanInputs as for selective_scan_forward (CPU tensors): initial_state is the sequence's (used
// by rank 0), final_state gets the state leaving this rank's shard (the sequence's on the last
// rank), dfinal_state is the gradient at the sequence's end (read on the last rank), and
// dinitial_state gets the gradient of the state entering this shard (the sequence's on rank 0).
#pragma once

#include "layers/selective_scan/selective_scan.h"
#include "parallel/communicator.h"

namespace braid {

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& workspace, Communicator& cp);
void selective_scan_backward_cp(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                const ScanGrads& grads, const Tensor& workspace, Communicator& cp);

}  // namespace braid
