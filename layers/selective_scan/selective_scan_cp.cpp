#include "layers/selective_scan/selective_scan_cp.h"

#include <cmath>
#include <deque>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/common/state_passing.h"

namespace braid {
namespace {

// The dtype of the states passed: the inputs' on the CPU, f32 on the GPU (the kernels' states).
DType state_dtype(const ScanInputs& in) {
  return in.u->device == Device::cuda ? DType::f32 : in.u->dtype;
}

// This shard's decay per (b, c, n): exp(A sum_t dt_t), 0 where a document starts inside it (from
// host copies of delta, delta_bias, A and seq_idx where they are on the GPU).
ShardMap shard_map(const ScanInputs& in, const ScanDims& d) {
  void* st = in.stream;
  const std::vector<double> delta = tensor_values(*in.delta, st), a = tensor_values(*in.A, st),
                            bias = in.delta_bias ? tensor_values(*in.delta_bias, st)
                                                 : std::vector<double>(size_t(d.c), 0.0);
  const std::vector<int32_t> seq = host_documents(in.seq_idx, st);
  ShardMap m;
  std::vector<bool> starts;
  shard_documents(in.seq_idx ? seq.data() : nullptr, d.b, d.t, m, starts);
  m.decay.assign(d.b * d.c * d.n, 0.0);
  for (int64_t b = 0; b < d.b; ++b)
    for (int64_t c = 0; c < d.c && !starts[b]; ++c) {
      double sum = 0;
      for (int64_t t = 0; t < d.t; ++t) {
        const double x = delta[(b * d.t + t) * d.c + c] + bias[c];
        sum += in.delta_softplus ? (x > 20 ? x : std::log1p(std::exp(x))) : x;
      }
      for (int64_t n = 0; n < d.n; ++n)
        m.decay[(b * d.c + c) * d.n + n] = std::exp(sum * a[c * d.n + n]);
    }
  return m;
}

// The state entering this rank's shard (forward steps 1-2 of the header), given its map's decays
// and documents; runs the shard's scan from a zero state into y_scratch and the workspace.
ScratchTensor entering(const ScanInputs& in, const ScanDims& d, ShardMap m, const Tensor& y_scratch,
                       const Tensor& workspace, Communicator& cp) {
  ScanInputs zero = in;
  zero.initial_state = nullptr;
  const ScratchTensor h_loc(state_dtype(in), {d.b, d.c, d.n}, in.u->device, in.stream);
  selective_scan_forward(zero, y_scratch, &h_loc.t, &workspace);
  return shard_entering_state(std::move(m), h_loc.t, in.initial_state, cp, in.stream);
}

}  // namespace

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const ScratchTensor h_in = entering(in, d, shard_map(in, d), y, workspace, cp);
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  selective_scan_forward(from, y, final_state, &workspace);
}

void selective_scan_backward_cp(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                const ScanGrads& grads, const Tensor& workspace, Communicator& cp) {
  const ScanDims d = selective_scan_dims(in);
  const Device dev = in.u->device;
  void* st = in.stream;
  const ScratchTensor y_tmp(in.u->dtype, {d.b, d.t, d.c}, dev, st);
  const ShardMap map = shard_map(in, d);  // decays and documents, for both passes
  const ScratchTensor h_in = entering(in, d, map, y_tmp.t, workspace, cp);
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  // The GPU backward reads the chunk states its forward saved in the workspace: that forward is
  // the one from h_in.
  if (dev == Device::cuda) selective_scan_forward(from, y_tmp.t, nullptr, &workspace);
  // 1. Back through this shard with nothing arriving at its end: G, the gradient of h_in. The
  //    other gradients of this pass go to scratch (dA, dD, ddelta_bias accumulate).
  std::deque<ScratchTensor> scratch;
  auto like = [&](const Tensor* t) { return scratch_like(scratch, t, st); };
  const ScratchTensor g_loc(state_dtype(in), {d.b, d.c, d.n}, dev, st);
  selective_scan_backward(
      from, dy, nullptr,
      {like(grads.du), like(grads.ddelta), like(grads.dA), like(grads.dB), like(grads.dC),
       like(grads.dD), like(grads.dz), like(grads.ddelta_bias), &g_loc.t},
      workspace);
  // 2. The gradient arriving at this shard's end; 3. back again with it: every gradient exact.
  const ScratchTensor g_out = shard_arriving_grad(map, g_loc.t, dfinal_state, cp, st);
  selective_scan_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
