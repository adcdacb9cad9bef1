#include "layers/ssd/ssd_cp.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

struct Dims {
  int64_t b, t, h, p, n;
};
Dims dims_of(const SsdInputs& in) {
  BRAID_CHECK(in.x && in.dt && in.A && in.B && in.x->ndim == 4 && in.B->ndim == 4,
              "ssd (context parallel): expects x [B,T,H,P], dt, A, B [B,T,G,N]");
  return {in.x->size(0), in.x->size(1), in.x->size(2), in.x->size(3), in.B->size(3)};
}

// The dtype of the states passed: the inputs' on the CPU, f32 on the GPU (the kernels' states).
DType state_dtype(const SsdInputs& in) {
  return in.x->device == Device::cuda ? DType::f32 : in.x->dtype;
}

// This shard's decay, exp(A_h sum_t dt_t) for every (p, n) of head h, 0 where a document starts
// inside it (from host copies of dt, A, dt_bias and seq_idx where they are on the GPU).
ShardMap shard_map(const SsdInputs& in, const Dims& d) {
  void* st = in.stream;
  const std::vector<double> dt = tensor_values(*in.dt, st), a = tensor_values(*in.A, st),
                            bias = in.dt_bias ? tensor_values(*in.dt_bias, st)
                                              : std::vector<double>(size_t(d.h), 0.0);
  const std::vector<int32_t> seq = host_documents(in.seq_idx, st);
  ShardMap m;
  std::vector<bool> starts;
  shard_documents(in.seq_idx ? seq.data() : nullptr, d.b, d.t, m, starts);
  const int64_t pn = d.p * d.n;
  m.decay.assign(d.b * d.h * pn, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t h = 0; h < d.h && !starts[b]; ++h) {
      double sum = 0;
      for (int64_t t = 0; t < d.t; ++t) {
        double x = dt[(b * d.t + t) * d.h + h] + bias[h];
        if (in.dt_softplus) x = x > 20 ? x : std::log1p(std::exp(x));
        sum += std::min(std::max(x, in.dt_min), in.dt_max);
      }
      std::fill_n(m.decay.begin() + (b * d.h + h) * pn, pn, std::exp(sum * a[h]));
    }
  return m;
}

// The state entering this rank's shard, given its map's decays and documents (runs the shard's
// forward from a zero state into y_scratch and the workspace).
ScratchTensor entering(const SsdInputs& in, const Dims& d, ShardMap m, const Tensor& y_scratch,
                       const Tensor& workspace, Communicator& cp) {
  SsdInputs zero = in;
  zero.initial_state = nullptr, zero.y_scan = nullptr;
  const ScratchTensor h_loc(state_dtype(in), {d.b, d.h, d.p, d.n}, in.x->device, in.stream);
  ssd_forward(zero, y_scratch, &h_loc.t, workspace);
  return shard_entering_state(std::move(m), h_loc.t, in.initial_state, cp, in.stream);
}

}  // namespace

void ssd_forward_cp(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                    const Tensor& workspace, Communicator& cp) {
  const Dims d = dims_of(in);
  const ScratchTensor h_in = entering(in, d, shard_map(in, d), y, workspace, cp);
  SsdInputs from = in;
  from.initial_state = &h_in.t;
  ssd_forward(from, y, final_state, workspace);
}

void ssd_backward_cp(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                     const SsdGrads& grads, const Tensor& forward_workspace,
                     const Tensor& workspace, Communicator& cp) {
  const Dims d = dims_of(in);
  const Device dev = in.x->device;
  void* st = in.stream;
  const ScratchTensor y_tmp(in.x->dtype, {d.b, d.t, d.h, d.p}, dev, st);
  const ShardMap map = shard_map(in, d);  // decays and documents, for both passes
  const ScratchTensor h_in = entering(in, d, map, y_tmp.t, forward_workspace, cp);
  SsdInputs from = in;
  from.initial_state = &h_in.t;
  // The GPU backward reads what the forward left in the workspace: the forward from h_in.
  if (dev == Device::cuda) ssd_forward(from, y_tmp.t, nullptr, workspace);
  std::deque<ScratchTensor> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t, st); };

  const ScratchTensor g_loc(state_dtype(in), {d.b, d.h, d.p, d.n}, dev, st);
  ssd_backward(from, dy, nullptr,
               {like(grads.dx), like(grads.ddt), like(grads.dA), like(grads.dB), like(grads.dC),
                like(grads.dD), like(grads.ddt_bias), &g_loc.t},
               workspace);
  const ScratchTensor g_out = shard_arriving_grad(map, g_loc.t, dfinal_state, cp, st);
  ssd_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
