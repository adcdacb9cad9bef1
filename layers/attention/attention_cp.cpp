#include "layers/attention/attention_cp.h"

#include <cstring>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/scratch_tensor.h"

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#endif

namespace braid {
namespace {

// Copies `height` rows of `width` bytes from src (row pitch spitch) to dst (row pitch dpitch) on
// the tensors' device (GPU: on `stream`, after the work queued there).
void copy_rows(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
               size_t height, Device device, void* stream) {
  if (device == Device::cpu) {
    for (size_t i = 0; i < height; ++i)
      std::memcpy(static_cast<char*>(dst) + i * dpitch, static_cast<const char*>(src) + i * spitch,
                  width);
    return;
  }
#if defined(BRAID_WITH_CUDA)
  CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice,
                               static_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
}

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
ScratchTensor gather(const Tensor& local, int dim, Communicator& cp, void* stream) {
  const Split s = split_at(local, dim);
  const int r_n = cp.size();
  const size_t row = size_t(s.tl * s.inner) * dtype_size(local.dtype);
  ScratchTensor all(local.dtype, {int64_t(r_n) * local.numel()}, local.device, stream);
  cp.all_gather_ordered(local, all.t);
  ScratchTensor full(local.dtype, shape_with(local, dim, s.tl * r_n), local.device, stream);
  for (int r = 0; r < r_n; ++r)
    copy_rows(static_cast<char*>(full.t.data) + r * row, r_n * row,
              static_cast<const char*>(all.t.data) + r * s.outer * row, row, row, size_t(s.outer),
              local.device, stream);
  return full;
}

// This rank's shard of the sum over the ranks of whole-sequence tensors: reorder to
// [rank][outer][tl][inner], then reduce-scatter.
void reduce_to_owner(const ScratchTensor& full, const Tensor& local, int dim, Communicator& cp,
                     void* stream) {
  const Split s = split_at(local, dim);
  const int r_n = cp.size();
  const size_t row = size_t(s.tl * s.inner) * dtype_size(local.dtype);
  ScratchTensor packed(local.dtype, {int64_t(r_n) * local.numel()}, local.device, stream);
  for (int r = 0; r < r_n; ++r)
    copy_rows(static_cast<char*>(packed.t.data) + r * s.outer * row, row,
              static_cast<const char*>(full.t.data) + r * row, r_n * row, row, size_t(s.outer),
              local.device, stream);
  cp.reduce_scatter_ordered(packed.t, local, ReduceOp::sum);
}

void check_cp(const AttentionInputs& in, std::initializer_list<const Tensor*> more) {
  BRAID_CHECK(in.q && in.k && in.v && in.q->ndim == 4,
              "attention (context parallel): expects q [B,T,H,P], k, v [B,T,Hk,P]");
  BRAID_CHECK(!in.rows, "attention (context parallel): picks its own rows");
  const char* op = "attention (context parallel)";
  if (in.q->device == Device::cuda) {  // every tensor on the GPU, moved by an NCCL cp group
    require_gpu(op, {in.q, in.k, in.v, in.seq_idx});
    require_gpu(op, more);
  } else {
    require_host(op, {in.q, in.k, in.v, in.seq_idx});
    require_host(op, more);
  }
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
  void* st = in.stream;
  const Device dev = in.q->device;
  const ScratchTensor q = gather(*in.q, 1, cp, st), k = gather(*in.k, 1, cp, st),
                      v = gather(*in.v, 1, cp, st);
  const int64_t t = q.t.size(1);
  const ScratchTensor seq =
      in.seq_idx ? gather(*in.seq_idx, 1, cp, st) : ScratchTensor(DType::i32, {0}, dev, st);
  const AttentionRows rows = cp_attention_rows(t, cp.rank(), cp.size());
  const ScratchTensor of(o.dtype, shape_with(o, 1, t), dev, st),
      lf(lse.dtype, shape_with(lse, 2, t), dev, st);
  AttentionInputs whole = in;
  whole.q = &q.t, whole.k = &k.t, whole.v = &v.t, whole.seq_idx = in.seq_idx ? &seq.t : nullptr;
  whole.rows = &rows;
  attention_forward(whole, of.t, lf.t);
  reduce_to_owner(of, o, 1, cp, st);
  reduce_to_owner(lf, lse, 2, cp, st);
}

void attention_backward_cp(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                           const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                           Communicator& cp) {
  check_cp(in, {&o, &lse, &dout, &dq, &dk, &dv});
  void* st = in.stream;
  const Device dev = in.q->device;
  const ScratchTensor q = gather(*in.q, 1, cp, st), k = gather(*in.k, 1, cp, st),
                      v = gather(*in.v, 1, cp, st);
  const ScratchTensor of = gather(o, 1, cp, st), lf = gather(lse, 2, cp, st),
                      dof = gather(dout, 1, cp, st);
  const int64_t t = q.t.size(1);
  const ScratchTensor seq =
      in.seq_idx ? gather(*in.seq_idx, 1, cp, st) : ScratchTensor(DType::i32, {0}, dev, st);
  const AttentionRows rows = cp_attention_rows(t, cp.rank(), cp.size());
  const ScratchTensor dqf(dq.dtype, shape_with(dq, 1, t), dev, st),
      dkf(dk.dtype, shape_with(dk, 1, t), dev, st), dvf(dv.dtype, shape_with(dv, 1, t), dev, st);
  AttentionInputs whole = in;
  whole.q = &q.t, whole.k = &k.t, whole.v = &v.t, whole.seq_idx = in.seq_idx ? &seq.t : nullptr;
  whole.rows = &rows;
  // The GPU backward's workspace, for the whole sequence.
  const ScratchTensor ws(DType::f32,
                         {dev == Device::cpu ? 1 : attention_gpu_workspace_elems(whole)}, dev, st);
  if (dev != Device::cpu) whole.workspace = &ws.t;
  attention_backward(whole, of.t, lf.t, dof.t, dqf.t, dkf.t, dvf.t);
  reduce_to_owner(dqf, dq, 1, cp, st);
  reduce_to_owner(dkf, dk, 1, cp, st);
  reduce_to_owner(dvf, dv, 1, cp, st);
}

}  // namespace braid
