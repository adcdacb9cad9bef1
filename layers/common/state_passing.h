// Context parallelism for state-space layers by state passing (shared by the selective scan, the
// SSD and the causal conv's halo): the cp ranks hold consecutive shards of every sequence, and the
// state leaving a shard is an affine function of the state entering it, h_out = P * h_in + H,
// elementwise (P = the shard's decay, 0 where a document starts inside it; H = its final state
// scanned from zero). Only these [rows, state] maps cross ranks, however long the sequence:
//   entering state   h_in(r) = the maps of shards 0 .. r-1 folded from the sequence's initial
//                    state (0 across a document that starts at a shard's first token);
//   arriving grad    the gradient arriving at shard r's end: g_r = G_{r+1} + P_{r+1} g_{r+1}
//                    folded from the gradient at the sequence's end (G = the gradient of each
//                    shard's entering state through its own outputs).
// Each rank's maps (its decays, states and edge document ids) are all-gathered over cp and every
// rank folds them: an exclusive scan across ranks, forward, and its mirror backward. CPU tensors
// fold in f64 on the host; GPU tensors over an NCCL cp group build, pass and fold the maps on the
// device in f32 (state_passing_cuda.h), with no host copy.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/tensor.h"

namespace braid {

// A shard's decay from its inputs (the selective scan's and the SSD's), per row b:
//   P[b, c, j] = exp(A[c, j] sum_t f(dt[b, t, c] + bias[c]))    (A [C] or [C, J])
// with f = softplus (where `softplus`) clamped to [lo, hi]; 0 where a document starts inside
// the row. Each P covers (state elements a row) / (C J) consecutive elements of the state (the
// SSD: the P N of a head; the scan: 1). dt [B,T,C] is f32 or f64 on the CPU, f32 or bf16 on the
// GPU; A and bias are f32 there.
struct ShardDecay {
  const Tensor* dt = nullptr;
  const Tensor* bias = nullptr;  // [C] or null
  const Tensor* A = nullptr;
  bool softplus = false;
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
};

// out = the state entering this rank's shard, from every rank's map: `local` is the shard's
// final state from zero ([B, ...]), `decay` its decay (null: none, as the conv's halo), seq_idx
// [B,T] its documents (null: one per row), `initial` the sequence's initial state (rank 0; null:
// zeros). out is shaped like local (on the GPU, f32 or bf16 as local). Collective over cp.
void shard_entering_state(const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                          const Tensor* initial, const Tensor& out, Communicator& cp, void* stream);
// out = the gradient arriving at the end of this rank's shard: `local` is the gradient of the
// shard's entering state through its own outputs, `dfinal` the gradient at the sequence's end
// (read on the last rank; null: none). Collective over cp.
void shard_arriving_grad(const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                         const Tensor* dfinal, const Tensor& out, Communicator& cp, void* stream);

}  // namespace braid
