// The GPU side of state passing (state_passing.h): a rank's maps are built, packed and folded on
// the device, in f32, so no state crosses the host. A rank's packed maps are one f32 buffer:
//   [rows] first and [rows] last document ids (i32 bit patterns), [rows, decays] decays,
//   [rows, per_row] states (H forward, G backward), [rows, per_row] the end gradient;
// decays = 0: no decay (the conv's halo), else each decay covers per_row / decays consecutive
// state elements. The cp group all-gathers them, and every rank folds the ranks' buffers.
#pragma once

#include <cstdint>

namespace braid {

struct PackedMaps {
  int64_t rows = 0, per_row = 0, decays = 0;
  int64_t decay_at() const { return 2 * rows; }
  int64_t state_at() const { return decay_at() + rows * decays; }
  int64_t extra_at() const { return state_at() + rows * per_row; }
  int64_t size() const { return extra_at() + rows * per_row; }
};

// The first and last document ids of each row of seq_idx [rows, t] into the buffer, and
// starts[row] = 1 where a document starts inside the row (after its first token).
void sp_documents_cuda(const int32_t* seq_idx, int64_t rows, int64_t t, float* packed,
                       int32_t* starts, void* stream);

// decay[row, c * a_cols + j] = exp(A[c, j] sum_t f(dt[row, t, c] + bias[c])), 0 where starts[row]
// (null: none): f = softplus (where `softplus`) clamped to [lo, hi]. dt [rows, t, c] is f32 or
// bf16 (dt_bf16); bias [c] f32 or null; partial: rows * sp_dt_parts(t) * c floats of scratch.
struct SpDecayArgs {
  const void* dt = nullptr;
  bool dt_bf16 = false;
  const float *bias = nullptr, *A = nullptr;
  const int32_t* starts = nullptr;
  bool softplus = false;
  float lo = 0, hi = 0;
  int64_t rows = 0, t = 0, c = 0, a_cols = 1;
};
int64_t sp_dt_parts(int64_t t);
void sp_decays_cuda(const SpDecayArgs& a, float* partial, float* decay, void* stream);

// dst[i] = src[i] as f32, for n elements of f32 or bf16 (src_bf16).
void sp_pack_cuda(const void* src, bool src_bf16, int64_t n, float* dst, void* stream);

// Folds the ranks' buffers (all: [ranks, m.size()]) for `rank` into out [rows, per_row] (f32 or
// bf16: out_bf16, as `initial`):
//   entering  h = initial (null: 0); for q < rank: h = flows(q) ? P_q h + H_q : 0
//   arriving  g = the last rank's end gradient; for q = ranks - 2 down to rank:
//             g = flows(q) ? G_{q+1} + P_{q+1} g : 0
// flows(q): shard q's last document id equals shard q + 1's first.
void sp_fold_cuda(const float* all, const PackedMaps& m, int ranks, int rank, bool entering,
                  const void* initial, bool out_bf16, void* out, void* stream);

}  // namespace braid
