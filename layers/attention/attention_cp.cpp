#include "layers/attention/attention_cp.h"

#include <cstring>
#include <vector>

#include "layers/common/op_common.h"

namespace braid {
namespace {

// Host storage of a whole-sequence tensor [outer, T, inner] of one dtype.
struct Full {
  std::vector<char> bytes;
  Tensor t;
  Full(DType dtype, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    bytes.assign(n * dtype_size(dtype), 0);
    t = Tensor::contiguous_view(bytes.data(), dtype, Device::cpu, shape, "cp_full");
  }
};

// A tensor's elements as [outer, tl, inner] around its sequence dimension `dim`.
struct Split {
  int64_t outer = 1, tl = 1, inner = 1;
};
Split split_at(const Tensor& t, int dim) {
  Split s;
  for (int i = 0; i < dim; ++i) s.outer *= t.size(i);
  s.tl = t.size(dim);
  for (int i = dim + 1; i < t.ndim; ++i) s.inner *= t.size(i);
  return s;
}
std::vector<int64_t> shape_with(const Tensor& t, int dim, int64_t len) {
  std::vector<int64_t> s(t.shape.begin(), t.shape.begin() + t.ndim);
  s[dim] = len;
  return s;
}

// The whole sequence from every rank's shard: all-gather ([rank][outer][tl][inner]), then
// reorder to [outer][rank tl][inner].
Full gather(const Tensor& local, int dim, Communicator& cp) {
  const Split s = split_at(local, dim);
  const int r_n = cp.size();
  const size_t es = dtype_size(local.dtype), row = size_t(s.tl * s.inner) * es;
  Full all(local.dtype, {int64_t(r_n) * local.numel()});
  cp.all_gather(local, all.t);
  Full full(local.dtype, shape_with(local, dim, s.tl * r_n));
  for (int r = 0; r < r_n; ++r)
    for (int64_t o = 0; o < s.outer; ++o)
      std::memcpy(full.bytes.data() + (o * r_n + r) * row,
                  all.bytes.data() + (r * s.outer + o) * row, row);
  return full;
}

// This rank's shard of the sum over the ranks of whole-sequence tensors: reorder to
// [rank][outer][tl][inner], then reduce-scatter.
void reduce_to_owner(const Full& full, const Tensor& local, int dim, Communicator& cp) {
  const Split s = split_at(local, dim);
  const int r_n = cp.size();
  const size_t row = size_t(s.tl * s.inner) * dtype_size(local.dtype);
  Full packed(local.dtype, {int64_t(r_n) * local.numel()});
  for (int r = 0; r < r_n; ++r)
    for (int64_t o = 0; o < s.outer; ++o)
      std::memcpy(packed.bytes.data() + (r * s.outer + o) * row,
                  full.bytes.data() + (o * r_n + r) * row, row);
  cp.reduce_scatter(packed.t, local, ReduceOp::sum);
}

void check_cp(const AttentionInputs& in, std::initializer_list<const Tensor*> more) {
  BRAID_CHECK(in.q && in.k && in.v && in.q->ndim == 4,
              "attention (context parallel): expects q [B,T,H,P], k, v [B,T,Hk,P]");
  BRAID_CHECK(!in.rows, "attention (context parallel): picks its own rows");
  require_host("attention (context parallel)", {in.q, in.k, in.v, in.seq_idx});
  require_host("attention (context parallel)", more);
}

}  // namespace

AttentionRows cp_attention_rows(int64_t t, int r, int ranks) {
  auto edge = [&](int64_t k) { return k * t / (2 * ranks); };
  AttentionRows rows;
  rows.begin[0] = edge(r), rows.end[0] = edge(r + 1);
  rows.begin[1] = edge(2 * ranks - 1 - r), rows.end[1] = edge(2 * ranks - r);
  return rows;
}

void attention_forward_cp(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                          Communicator& cp) {
  check_cp(in, {&o, &lse});
  const Full q = gather(*in.q, 1, cp), k = gather(*in.k, 1, cp), v = gather(*in.v, 1, cp);
  const int64_t t = q.t.size(1);
  const Full seq = in.seq_idx ? gather(*in.seq_idx, 1, cp) : Full(DType::i32, {0});
  const AttentionRows rows = cp_attention_rows(t, cp.rank(), cp.size());
  Full of(o.dtype, shape_with(o, 1, t)), lf(lse.dtype, shape_with(lse, 2, t));
  attention_forward({&q.t, &k.t, &v.t, in.seq_idx ? &seq.t : nullptr, in.scale, &rows}, of.t, lf.t);
  reduce_to_owner(of, o, 1, cp);
  reduce_to_owner(lf, lse, 2, cp);
}

void attention_backward_cp(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                           const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                           Communicator& cp) {
  check_cp(in, {&o, &lse, &dout, &dq, &dk, &dv});
  const Full q = gather(*in.q, 1, cp), k = gather(*in.k, 1, cp), v = gather(*in.v, 1, cp);
  const Full of = gather(o, 1, cp), lf = gather(lse, 2, cp), dof = gather(dout, 1, cp);
  const int64_t t = q.t.size(1);
  const Full seq = in.seq_idx ? gather(*in.seq_idx, 1, cp) : Full(DType::i32, {0});
  const AttentionRows rows = cp_attention_rows(t, cp.rank(), cp.size());
  Full dqf(dq.dtype, shape_with(dq, 1, t)), dkf(dk.dtype, shape_with(dk, 1, t)),
      dvf(dv.dtype, shape_with(dv, 1, t));
  attention_backward({&q.t, &k.t, &v.t, in.seq_idx ? &seq.t : nullptr, in.scale, &rows}, of.t, lf.t,
                     dof.t, dqf.t, dkf.t, dvf.t);
  reduce_to_owner(dqf, dq, 1, cp);
  reduce_to_owner(dkf, dk, 1, cp);
  reduce_to_owner(dvf, dv, 1, cp);
}

}  // namespace braid
