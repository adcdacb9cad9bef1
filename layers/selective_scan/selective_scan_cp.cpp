#include "layers/selective_scan/selective_scan_cp.h"

#include <cmath>
#include <vector>

#include "layers/common/op_common.h"

namespace braid {
namespace {

// Host storage for a [B,C,N] state (or any shape) of the activations' dtype.
struct HostState {
  std::vector<double> storage;
  Tensor t;
  HostState(DType dtype, std::vector<int64_t> shape, const char* name) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    storage.assign(n, 0.0);
    t = Tensor::contiguous_view(storage.data(), dtype, Device::cpu, shape, name);
  }
};

double get(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
}
void set(const Tensor& t, int64_t i, double v) {
  if (t.dtype == DType::f64)
    t.ptr<double>()[i] = v;
  else
    t.ptr<float>()[i] = float(v);
}

// What every rank shares: per row b the document ids of its shard's first and last tokens, and
// per (b, c, n) the decay P of its shard and k states, gathered from all ranks.
struct Shared {
  int64_t rows = 0, bcn = 0, k = 0;
  std::vector<double> all;  // [rank][2 rows + (1 + k) bcn]
  double first_doc(int r, int64_t b) const { return all[at(r) + b]; }
  double last_doc(int r, int64_t b) const { return all[at(r) + rows + b]; }
  double decay(int r, int64_t i) const { return all[at(r) + 2 * rows + i]; }
  double state(int r, int j, int64_t i) const { return all[at(r) + 2 * rows + (1 + j) * bcn + i]; }
  size_t at(int r) const { return size_t(r) * (2 * rows + (1 + k) * bcn); }
};

// This shard's decay per (b, c, n), exp(A sum_t dt_t) or 0 where a document starts inside it,
// with the given states (null: zeros), shared with every rank.
Shared share(const ScanInputs& in, const ScanDims& d, std::initializer_list<const Tensor*> states,
             Communicator& cp) {
  Shared s{d.b, d.b * d.c * d.n, int64_t(states.size()), {}};
  std::vector<double> mine(2 * d.b + (1 + s.k) * s.bcn, 0.0);
  for (int64_t b = 0; b < d.b; ++b) {
    const int32_t* seq = in.seq_idx ? in.seq_idx->ptr<int32_t>() + b * d.t : nullptr;
    mine[b] = seq ? seq[0] : 0;
    mine[d.b + b] = seq ? seq[d.t - 1] : 0;
    bool reset = false;
    for (int64_t t = 1; seq && t < d.t; ++t) reset = reset || seq[t] != seq[t - 1];
    for (int64_t c = 0; c < d.c; ++c) {
      double sum = 0;
      for (int64_t t = 0; t < d.t && !reset; ++t) {
        double x = get(*in.delta, (b * d.t + t) * d.c + c) +
                   (in.delta_bias ? get(*in.delta_bias, c) : 0.0);
        if (in.delta_softplus) x = x > 20 ? x : std::log1p(std::exp(x));
        sum += x;
      }
      for (int64_t n = 0; n < d.n; ++n)
        mine[2 * d.b + (b * d.c + c) * d.n + n] =
            reset ? 0.0 : std::exp(sum * get(*in.A, c * d.n + n));
    }
  }
  int j = 0;
  for (const Tensor* st : states) {
    for (int64_t i = 0; st && i < s.bcn; ++i) mine[2 * d.b + (1 + j) * s.bcn + i] = get(*st, i);
    ++j;
  }
  s.all.resize(mine.size() * cp.size());
  cp.all_gather(Tensor::contiguous_view(mine.data(), DType::f64, Device::cpu,
                                        {int64_t(mine.size())}, "cp_mine"),
                Tensor::contiguous_view(s.all.data(), DType::f64, Device::cpu,
                                        {int64_t(s.all.size())}, "cp_all"));
  return s;
}

// The state entering rank r's shard: the earlier shards' maps h -> P h + H folded from the
// sequence's start (0 where a document starts at a shard's first token).
void entering_state(const ScanInputs& in, const ScanDims& d, const Shared& s, int r,
                    const Tensor& h_in);

// Does the state leaving rank r's shard flow into rank r + 1's (the same document at the edge)?
bool flows(const Shared& s, const ScanInputs& in, int r, int64_t b) {
  return !in.seq_idx || s.last_doc(r, b) == s.first_doc(r + 1, b);
}

void entering_state(const ScanInputs& in, const ScanDims& d, const Shared& s, int r,
                    const Tensor& h_in) {
  for (int64_t i = 0; i < s.bcn; ++i) {
    double h = in.initial_state ? get(*in.initial_state, i) : 0.0;
    for (int q = 0; q < r; ++q)
      h = flows(s, in, q, i / (d.c * d.n)) ? s.decay(q, i) * h + s.state(q, 0, i) : 0.0;
    set(h_in, i, h);
  }
}

void require_cpu(const ScanInputs& in) {
  require_host("selective_scan (context parallel)",
               {in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.delta_bias, in.seq_idx});
}

}  // namespace

void selective_scan_forward_cp(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                               const Tensor& workspace, Communicator& cp) {
  require_cpu(in);
  const ScanDims d = selective_scan_dims(in);
  const int r = cp.rank();
  // 1. This shard from zero: H.
  ScanInputs zero = in;
  zero.initial_state = nullptr;
  HostState h_loc(in.u->dtype, {d.b, d.c, d.n}, "h_local");
  selective_scan_forward(zero, y, &h_loc.t, &workspace);
  // 2. The state entering this shard.
  HostState h_in(in.u->dtype, {d.b, d.c, d.n}, "h_in");
  entering_state(in, d, share(in, d, {&h_loc.t}, cp), r, h_in.t);
  // 3. This shard again from its true entering state.
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  selective_scan_forward(from, y, final_state, &workspace);
}

void selective_scan_backward_cp(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                                const ScanGrads& grads, const Tensor& workspace, Communicator& cp) {
  require_cpu(in);
  const ScanDims d = selective_scan_dims(in);
  const int r = cp.rank(), last = cp.size() - 1;
  // The entering state again (forward steps 1-2; the forward's y is not needed).
  HostState y_tmp(in.u->dtype, {d.b, d.t, d.c}, "y_tmp"), h_loc(in.u->dtype, {d.b, d.c, d.n}, "H");
  ScanInputs zero = in;
  zero.initial_state = nullptr;
  selective_scan_forward(zero, y_tmp.t, &h_loc.t, &workspace);
  HostState h_in(in.u->dtype, {d.b, d.c, d.n}, "h_in");
  entering_state(in, d, share(in, d, {&h_loc.t}, cp), r, h_in.t);
  ScanInputs from = in;
  from.initial_state = &h_in.t;
  // 1. Back through this shard with nothing arriving at its end: G = the gradient of h_in.
  //    (Scratch gradients: the accumulated ones (dA, dD, ddelta_bias) must not see this pass.)
  std::vector<HostState> scratch;
  auto like = [&](const Tensor* t, const char* name) -> const Tensor* {
    if (!t) return nullptr;
    scratch.emplace_back(t->dtype,
                         std::vector<int64_t>(t->shape.begin(), t->shape.begin() + t->ndim), name);
    return &scratch.back().t;
  };
  scratch.reserve(10);
  HostState g_loc(in.u->dtype, {d.b, d.c, d.n}, "G");
  const ScanGrads first{like(grads.du, "du"), like(grads.ddelta, "ddelta"),  like(grads.dA, "dA"),
                        like(grads.dB, "dB"), like(grads.dC, "dC"),          like(grads.dD, "dD"),
                        like(grads.dz, "dz"), like(grads.ddelta_bias, "db"), &g_loc.t};
  selective_scan_backward(from, dy, nullptr, first, workspace);
  // 2. The gradient arriving at this shard's end: g_q = G_{q+1} + P_{q+1} g_{q+1} folded from
  //    the sequence's end (the caller's gradient, on the last rank), 0 across a document start.
  const Shared bs = share(in, d, {&g_loc.t, r == last ? dfinal_state : nullptr}, cp);
  HostState g_out(in.u->dtype, {d.b, d.c, d.n}, "g_out");
  for (int64_t i = 0; i < bs.bcn; ++i) {
    const int64_t b = i / (d.c * d.n);
    double g = bs.state(last, 1, i);
    for (int q = last - 1; q >= r; --q)
      g = flows(bs, in, q, b) ? bs.state(q + 1, 0, i) + bs.decay(q + 1, i) * g : 0.0;
    set(g_out.t, i, g);
  }
  // 3. Back again with it: every gradient, and that of the entering state.
  selective_scan_backward(from, dy, &g_out.t, grads, workspace);
}

}  // namespace braid
