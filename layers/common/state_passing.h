// Context parallelism for state-space layers by state passing (shared by the selective scan and
// SSD): the cp ranks hold consecutive shards of every sequence, and the state leaving a shard is
// an affine function of the state entering it, h_out = P * h_in + H, elementwise (P = the
// shard's decay, 0 where a document starts inside it; H = its final state scanned from zero).
// Only these [rows, state] maps cross ranks, however long the sequence:
//   entering_state   h_in(r) = the maps of shards 0 .. r-1 folded from the sequence's initial
//                    state (0 across a document that starts at a shard's first token);
//   arriving_grad    the gradient arriving at shard r's end: g_r = G_{r+1} + P_{r+1} g_{r+1}
//                    folded from the caller's gradient at the sequence's end (G = the gradient of
//                    each shard's entering state through its own outputs).
// A ShardMap holds this rank's part and, per row, its first and last tokens' document ids. The conv
// halo is such a map with no decay (causal_conv1d_cp.cpp).
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/tensor.h"

namespace braid {

struct ShardMap {
  std::vector<double> first_doc, last_doc;  // [rows]
  std::vector<double> decay;                // [rows * per_row]: P
  std::vector<double> state;                // [rows * per_row]: H (forward) or G (backward)
  std::vector<double> extra;                // [rows * per_row]: the last rank's end gradient
};

// Every rank's maps (collective over cp), in rank order. Over a cp group that moves GPU tensors
// (NCCL) the maps pass through a GPU buffer (via = Device::cuda, on `stream`).
class StatePassing {
 public:
  StatePassing(const ShardMap& mine, int64_t per_row, Communicator& cp, Device via = Device::cpu,
               void* stream = nullptr);
  // The state entering this rank's shard, from the sequence's initial state (empty: zeros).
  std::vector<double> entering_state(const std::vector<double>& initial) const;
  // The gradient arriving at the end of this rank's shard (the last rank's `extra` is the
  // gradient at the sequence's end).
  std::vector<double> arriving_grad() const;

 private:
  const double* part(int r, int k) const;  // k: 0 decay, 1 state, 2 extra
  bool flows(int r, int64_t row) const;    // shard r's end state enters shard r + 1
  int rank_, ranks_;
  int64_t rows_, per_row_, size_;
  std::vector<double> all_;  // [rank][2 rows + 3 size]
};

// The document id of every row's first and last tokens in seq_idx [B,T] (null: all 0), and
// whether a document starts inside each row's shard (after its first token).
void shard_documents(const void* seq_idx, int64_t rows, int64_t t, ShardMap& map,
                     std::vector<bool>& starts_inside);

// Zeroed storage of one tensor (any dtype) on a device: host memory, or on the GPU a buffer of
// CUDA's stream-ordered pool on `stream`, freed there (context parallelism's scratch: not in the
// caller's memory plan).
class ScratchTensor {
 public:
  Tensor t;
  ScratchTensor(DType dtype, std::vector<int64_t> shape, Device device, void* stream);
  ScratchTensor(ScratchTensor&& o) noexcept;
  ScratchTensor(const ScratchTensor&) = delete;
  ScratchTensor& operator=(const ScratchTensor&) = delete;
  ScratchTensor& operator=(ScratchTensor&&) = delete;
  ~ScratchTensor();

 private:
  std::vector<double> host_;  // 8 bytes an element: room for any dtype
  void* dev_ = nullptr;
  void* stream_ = nullptr;
};
// The state entering this rank's shard as a tensor like `local` (the shard's final state scanned
// from zero, [rows, ...]), from the map (decays, documents) and the sequence's initial state (null:
// zeros); and the gradient arriving at this rank's shard's end, like `local` (the gradient of the
// shard's entering state through its own outputs), from the map and the gradient at the sequence's
// end (null: none; the last rank's). Collective over cp.
ScratchTensor shard_entering_state(ShardMap map, const Tensor& local, const Tensor* initial,
                                   Communicator& cp, void* stream);
ScratchTensor shard_arriving_grad(ShardMap map, const Tensor& local, const Tensor* dfinal,
                                  Communicator& cp, void* stream);

// The document ids of seq_idx [B,T] (i32, either device) on the host; empty for null.
std::vector<int32_t> host_documents(const Tensor* seq_idx, void* stream);
// A ScratchTensor shaped like t on t's device, kept in `keep` (null for null).
const Tensor* scratch_like(std::deque<ScratchTensor>& keep, const Tensor* t, void* stream);
// The values of a contiguous f64, f32, bf16 or i32 tensor on either device, as f64 (GPU: copied
// on `stream` after its queued work), and the tensor set from such values.
std::vector<double> tensor_values(const Tensor& t, void* stream);
void set_tensor_values(const Tensor& t, const std::vector<double>& v, void* stream);

}  // namespace braid
