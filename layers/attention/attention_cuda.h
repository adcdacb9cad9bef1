// The CUDA contract of attention: one Params struct (pointers, sizes), built and validated on the
// host by attention.cpp, and the layout of the f32 workspace of the backward. q, k, v, o, dout,
// dq, dk, dv are bf16 ([B,T,H,P] and [B,T,Hk,P] rows), lse f32 [B,H,T], seq_idx i32 [B,T]
// (non-decreasing along T). The kernels and their algorithm are described in attention_fwd.cu
// and attention_bwd.cu.
#pragma once

#include <cstdint>

#include "layers/attention/attention.h"
#include "runtime/philox.h"  // BRAID_HD

namespace braid {

constexpr int kAttnBwdRows = 64;  // query rows per backward step (the dq accumulator's tile)

// Offsets (f32 elements) into the backward's workspace; Tq = T rounded up to kAttnBwdRows.
struct AttnGeometry {
  int64_t tq = 0;
  int64_t dq_acc = 0;  // dq before the softmax scale, f32 [B,H,Tq,P]
  int64_t delta = 0;   // D_t = do_t . o_t, [B,H,Tq] (0 past T)
  int64_t lse2 = 0;    // lse_t log2(e), [B,H,Tq] (0 past T)
  int64_t sem = 0;     // i32 [B,H,Tq/64]: dq contributions added so far (deterministic order)
  int64_t total = 0;
};
AttnGeometry attention_geometry(int64_t b, int64_t t, int64_t h, int64_t p);

// The query rows computed (AttentionRows, context parallelism): [begin[i], end[i]), i = 0, 1;
// every row when !active.
struct AttnRowSet {
  bool active = false;
  int begin[2] = {0, 0}, end[2] = {0, 0};
  BRAID_HD bool has(int t) const {
    return !active || (t >= begin[0] && t < end[0]) || (t >= begin[1] && t < end[1]);
  }
  // Rows [a, b) all in the set, or some of them.
  BRAID_HD bool covers(int a, int b) const {
    return !active || (a >= begin[0] && b <= end[0]) || (a >= begin[1] && b <= end[1]);
  }
  BRAID_HD bool meets(int a, int b) const {
    return !active || (a < end[0] && b > begin[0]) || (a < end[1] && b > begin[1]);
  }
};

// The tiles lo .. hi (of `tile` rows each) that meet a row set, as at most two runs of
// consecutive tiles, each tile once: tile(k) is the k-th of count(). The backward's key blocks
// walk only these query tiles.
struct TileRuns {
  int lo0 = 0, n0 = 0, lo1 = 0, n1 = 0;
  BRAID_HD TileRuns(const AttnRowSet& r, int lo, int hi, int tile) {
    if (!r.active) {
      lo0 = lo, n0 = hi - lo + 1;
      return;
    }
    for (int i = 0; i < 2; ++i) {
      const int a = lo > r.begin[i] / tile ? lo : r.begin[i] / tile;
      const int z = hi < (r.end[i] - 1) / tile ? hi : (r.end[i] - 1) / tile;
      const int n = r.end[i] > r.begin[i] && z >= a ? z - a + 1 : 0;
      (i == 0 ? lo0 : lo1) = a, (i == 0 ? n0 : n1) = n;
    }
    if (n0 > 0 && n1 > 0 && lo1 < lo0 + n0) {  // the runs share a tile: the second starts after
      const int end1 = lo1 + n1;
      lo1 = lo0 + n0, n1 = end1 > lo1 ? end1 - lo1 : 0;
    }
  }
  BRAID_HD int count() const { return n0 + n1; }
  BRAID_HD int tile(int k) const { return k < n0 ? lo0 + k : lo1 + (k - n0); }
};

struct AttnParams {
  int batch = 0, seqlen = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0.f;       // softmax scale
  float scale_log2 = 0.f;  // scale log2(e): the kernels' exponentials are base 2
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  const int32_t* seq_idx = nullptr;
  AttnRowSet rows;  // the forward writes o and lse of these rows only; the backward's dq is 0
                    // elsewhere and dk, dv sum these rows' queries only
  void* o = nullptr;
  float* lse = nullptr;
  // Backward.
  const void* dout = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* ws = nullptr;
  AttnGeometry geo;
  bool deterministic = true;
  bool use_wgmma = false;  // the forward uses the Hopper kernel (TMA, wgmma) on sm_90 devices
};

// Sizes of an attention call, its tensors' shapes checked (any device and dtype).
struct AttentionDims {
  int64_t b, t, h, hk, p;
};
AttentionDims attention_dims(const AttentionInputs& in, const Tensor& o, const Tensor& lse);

// The GPU paths of attention_forward / attention_backward (attention.cpp).
void attention_forward_gpu(const AttentionInputs& in, const Tensor& o, const Tensor& lse);
void attention_backward_gpu(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                            const Tensor& dout, const Tensor& dq, const Tensor& dk,
                            const Tensor& dv);

// The kernels' launches (attention_fwd.cu, attention_bwd.cu), and the f32 path's
// (attention_f32.cu: every tensor that is bf16 above f32, the workspace's first B H T elements).
void attention_fwd_cuda(const AttnParams& p, void* stream);
void attention_bwd_cuda(const AttnParams& p, void* stream);
void attention_fwd_f32_cuda(const AttnParams& p, void* stream);
void attention_bwd_f32_cuda(const AttnParams& p, void* stream);

}  // namespace braid
