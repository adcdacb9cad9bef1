// Causal attention under context parallelism. The cp ranks hold consecutive shards of every
// sequence: q, k, v, o, lse, dout and the gradients are this rank's shard ([B,Tl,...], lse
// [B,H,Tl]); seq_idx [B,Tl] numbers documents over the whole sequence, so documents continue
// across shard edges and never attend to each other.
// Load-balanced causal split: the sequence (T = R Tl over R ranks) is cut into 2R chunks and
// rank r computes the query rows of chunks r and 2R-1-r, one early and one late, against every
// earlier key, so all ranks do the same causal work whatever their shard. q, k, v (and in the
// backward o, lse, dout) are all-gathered over cp; the rows a rank computed go back to their
// owners, and the dk, dv that its queries give every key are summed onto the keys' owners, both
// by reduce-scatter (a row computed on one rank is added to zeros: exact). Communication per
// layer is O(T) per rank and independent of the head count (no requirement that cp divide it).
// CPU tensors (f32, f64) over any cp group, or GPU tensors (bf16, f32) over an NCCL cp group: the
// whole-sequence buffers then come from CUDA's stream-ordered pool on in.stream (not from the
// caller's memory plan), and the GPU backward's workspace with them.
#pragma once

#include "layers/attention/attention.h"
#include "parallel/communicator.h"

namespace braid {

// The query rows rank r of R computes in a sequence of T tokens.
AttentionRows cp_attention_rows(int64_t t, int r, int ranks);

void attention_forward_cp(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                          Communicator& cp);
void attention_backward_cp(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                           const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                           Communicator& cp);

}  // namespace braid
