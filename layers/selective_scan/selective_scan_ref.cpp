#include <cmath>

#include "layers/common/op_common.h"
#include "layers/selective_scan/selective_scan.h"
#include "layers/selective_scan/selective_scan_cuda.h"
#include "runtime/parallel_for.h"

namespace braid {

ScanDims selective_scan_dims(const ScanInputs& in) {
  BRAID_CHECK(in.u && in.delta && in.A && in.B && in.C,
              "selective_scan: u, delta, A, B, C are required");
  BRAID_CHECK(in.u->ndim == 3 && in.A->ndim == 2 && in.B->ndim == 4,
              "selective_scan: expects u [B,T,C], A [C,N], B [B,T,G,N]; got ", in.u->describe(),
              ", ", in.A->describe(), ", ", in.B->describe());
  const ScanDims d{in.u->size(0), in.u->size(1), in.u->size(2), in.A->size(1), in.B->size(2)};
  BRAID_CHECK(d.g >= 1 && d.c % d.g == 0, "selective_scan: groups ", d.g, " must divide channels ",
              d.c);
  BRAID_CHECK(d.n >= 1 && d.n <= 256, "selective_scan: d_state ", d.n, " must be in [1, 256]");
  check_shape(*in.delta, {d.b, d.t, d.c});
  check_shape(*in.A, {d.c, d.n});
  check_shape(*in.B, {d.b, d.t, d.g, d.n});
  check_shape(*in.C, {d.b, d.t, d.g, d.n});
  if (in.D) check_shape(*in.D, {d.c});
  if (in.z) check_shape(*in.z, {d.b, d.t, d.c});
  if (in.delta_bias) check_shape(*in.delta_bias, {d.c});
  if (in.seq_idx) {
    BRAID_CHECK(in.seq_idx->dtype == DType::i32, "selective_scan: seq_idx must be i32");
    check_shape(*in.seq_idx, {d.b, d.t});
  }
  if (in.initial_state) check_shape(*in.initial_state, {d.b, d.c, d.n});
  return d;
}

namespace {

using Dims = ScanDims;

Dims check_scan(const ScanInputs& in) {
  const Dims d = selective_scan_dims(in);
  for (const Tensor* t : {in.delta, in.A, in.B, in.C}) check_same_dtype(*in.u, *t);
  if (in.D) check_same_dtype(*in.u, *in.D);
  if (in.z) check_same_dtype(*in.u, *in.z);
  if (in.delta_bias) check_same_dtype(*in.u, *in.delta_bias);
  if (in.initial_state) check_same_dtype(*in.u, *in.initial_state);
  require_host("selective_scan", {in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.delta_bias,
                                  in.seq_idx, in.initial_state});
  return d;
}

// Read-only access to the inputs of one (b, c) lane.
template <typename T>
struct Lane {
  const ScanInputs& in;
  Dims d;
  int64_t b, c, g;

  T dt_raw(int64_t t) const {
    return in.delta->ptr<T>()[(b * d.t + t) * d.c + c] +
           (in.delta_bias ? in.delta_bias->ptr<T>()[c] : T(0));
  }
  T dt(int64_t t) const { return in.delta_softplus ? softplus(dt_raw(t)) : dt_raw(t); }
  T u(int64_t t) const { return in.u->ptr<T>()[(b * d.t + t) * d.c + c]; }
  const T* Bt(int64_t t) const { return in.B->ptr<T>() + ((b * d.t + t) * d.g + g) * d.n; }
  const T* Ct(int64_t t) const { return in.C->ptr<T>() + ((b * d.t + t) * d.g + g) * d.n; }
  const T* A() const { return in.A->ptr<T>() + c * d.n; }
  bool reset(int64_t t) const {
    if (!in.seq_idx || t == 0) return false;
    const int32_t* s = in.seq_idx->ptr<int32_t>() + b * d.t;
    return s[t] != s[t - 1];
  }
  const T* h0() const {
    return in.initial_state ? in.initial_state->ptr<T>() + (b * d.c + c) * d.n : nullptr;
  }
  T Dv() const { return in.D ? in.D->ptr<T>()[c] : T(0); }
  T z(int64_t t) const { return in.z->ptr<T>()[(b * d.t + t) * d.c + c]; }
};

// Runs the recurrence of one lane; calls emit(t, h_t) after each step. h holds N values.
template <typename T, typename Emit>
void scan_lane(const Lane<T>& L, T* h, Emit&& emit) {
  const T* h0 = L.h0();
  for (int64_t n = 0; n < L.d.n; ++n) h[n] = h0 ? h0[n] : T(0);
  const T* A = L.A();
  for (int64_t t = 0; t < L.d.t; ++t) {
    const T dt = L.dt(t), u = L.u(t);
    const T* Bt = L.Bt(t);
    const bool rs = L.reset(t);
    for (int64_t n = 0; n < L.d.n; ++n)
      h[n] = (rs ? T(0) : std::exp(dt * A[n]) * h[n]) + dt * Bt[n] * u;
    emit(t, h);
  }
}

}  // namespace

void selective_scan_forward(const ScanInputs& in, const Tensor& y, const Tensor* final_state,
                            const Tensor* workspace) {
  if (in.u && in.u->device == Device::cuda)
    return selective_scan_forward_gpu(in, y, final_state, workspace);
  const Dims d = check_scan(in);
  check_shape(y, {d.b, d.t, d.c});
  check_same_dtype(*in.u, y);
  if (final_state) check_shape(*final_state, {d.b, d.c, d.n});
  require_host("selective_scan", {&y, final_state});
  dispatch_float(in.u->dtype, "selective_scan", [&]<typename T>() {
    T* yp = y.ptr<T>();
    parallel_for(d.b * d.c, [&](int64_t bc) {
      const int64_t b = bc / d.c, c = bc % d.c;
      const Lane<T> L{in, d, b, c, c / (d.c / d.g)};
      T h[256];
      scan_lane(L, h, [&](int64_t t, const T* ht) {
        const T* Ct = L.Ct(t);
        T acc = L.Dv() * L.u(t);
        for (int64_t n = 0; n < d.n; ++n) acc += Ct[n] * ht[n];
        yp[(b * d.t + t) * d.c + c] = in.z ? acc * silu(L.z(t)) : acc;
      });
      if (final_state) {
        T* fs = final_state->ptr<T>() + (b * d.c + c) * d.n;
        for (int64_t n = 0; n < d.n; ++n) fs[n] = h[n];
      }
    });
  });
}

void check_scan_grads(const ScanInputs& in, const ScanDims& d, const Tensor& dy,
                      const Tensor* dfinal_state, const ScanGrads& gr) {
  BRAID_CHECK(gr.du && gr.ddelta && gr.dA && gr.dB && gr.dC,
              "selective_scan_backward: du, ddelta, dA, dB, dC are required");
  BRAID_CHECK(!in.D || gr.dD, "selective_scan_backward: dD is required when D is given");
  BRAID_CHECK(!in.z || gr.dz, "selective_scan_backward: dz is required when z is given");
  BRAID_CHECK(!in.delta_bias || gr.ddelta_bias,
              "selective_scan_backward: ddelta_bias is required when delta_bias is given");
  for (const Tensor* t : {&dy, gr.du, gr.ddelta, gr.dz})
    if (t) check_shape(*t, {d.b, d.t, d.c});
  check_shape(*gr.dA, {d.c, d.n});
  check_shape(*gr.dB, {d.b, d.t, d.g, d.n});
  check_shape(*gr.dC, {d.b, d.t, d.g, d.n});
  if (gr.dD) check_shape(*gr.dD, {d.c});
  if (gr.ddelta_bias) check_shape(*gr.ddelta_bias, {d.c});
  for (const Tensor* t : {gr.dinitial_state, dfinal_state})
    if (t) check_shape(*t, {d.b, d.c, d.n});
}

int64_t selective_scan_workspace_elems(const ScanInputs& in) {
  if (in.u && in.u->device == Device::cuda) {
    const Dims d = selective_scan_dims(in);
    return scan_geometry(d.b, d.t, d.c, d.n, d.g).workspace_elems();
  }
  const Dims d = check_scan(in);
  return d.b * d.t * d.c * d.n;
}

int64_t selective_scan_scratch_elems(const ScanInputs& in) {
  if (!in.u || in.u->device != Device::cuda) return 0;
  const Dims d = selective_scan_dims(in);
  return scan_geometry(d.b, d.t, d.c, d.n, d.g).scratch_elems();
}

void selective_scan_backward(const ScanInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                             const ScanGrads& gr, const Tensor& workspace) {
  if (in.u && in.u->device == Device::cuda)
    return selective_scan_backward_gpu(in, dy, dfinal_state, gr, workspace);
  const Dims d = check_scan(in);
  check_scan_grads(in, d, dy, dfinal_state, gr);
  BRAID_CHECK(workspace.numel() >= d.b * d.t * d.c * d.n, "selective_scan_backward: workspace ",
              workspace.describe(), " smaller than ", d.b * d.t * d.c * d.n, " elements");
  require_host("selective_scan", {&dy, gr.du, gr.ddelta, gr.dA, gr.dB, gr.dC, gr.dD, gr.dz,
                                  gr.ddelta_bias, gr.dinitial_state, dfinal_state, &workspace});
  dispatch_float(in.u->dtype, "selective_scan", [&]<typename T>() {
    T* hs = workspace.ptr<T>();  // [B,C,T,N] states h_t
    const T* gy = dy.ptr<T>();
    T *du = gr.du->ptr<T>(), *ddelta = gr.ddelta->ptr<T>(), *dA = gr.dA->ptr<T>();
    T *dB = gr.dB->ptr<T>(), *dC = gr.dC->ptr<T>();
    const int64_t cpg = d.c / d.g;
    // Zero the (=) outputs that are accumulated over the channels of a group.
    for (int64_t i = 0; i < gr.dB->numel(); ++i) dB[i] = T(0), dC[i] = T(0);
    // One task per group: it owns dB/dC of its group and dA/dD/ddelta_bias of its channels, and
    // visits (b, c) in a fixed order, so gradients are bit-identical for any thread count.
    parallel_for(d.g, [&](int64_t g) {
      for (int64_t b = 0; b < d.b; ++b) {
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const Lane<T> L{in, d, b, c, g};
          T* hl = hs + (b * d.c + c) * d.t * d.n;
          T h[256];
          scan_lane(L, h, [&](int64_t t, const T* ht) {
            for (int64_t n = 0; n < d.n; ++n) hl[t * d.n + n] = ht[n];
          });
          T gh[256];
          const T* gf = dfinal_state ? dfinal_state->ptr<T>() + (b * d.c + c) * d.n : nullptr;
          for (int64_t n = 0; n < d.n; ++n) gh[n] = gf ? gf[n] : T(0);
          const T* A = L.A();
          const T* h0 = L.h0();
          T dD_acc = T(0), ddb_acc = T(0);
          for (int64_t t = d.t - 1; t >= 0; --t) {
            const int64_t i = (b * d.t + t) * d.c + c;
            const T* Ct = L.Ct(t);
            const T* Bt = L.Bt(t);
            const T* ht = hl + t * d.n;
            const T* hprev = t > 0 ? hl + (t - 1) * d.n : h0;
            T ys = L.Dv() * L.u(t);
            for (int64_t n = 0; n < d.n; ++n) ys += Ct[n] * ht[n];
            T gys = gy[i];
            if (in.z) {
              const T zt = L.z(t);
              gr.dz->ptr<T>()[i] = gy[i] * ys * silu_grad(zt);
              gys = gy[i] * silu(zt);
            }
            dD_acc += gys * L.u(t);
            const int64_t bg = ((b * d.t + t) * d.g + g) * d.n;
            const T dt = L.dt(t), u = L.u(t);
            const bool rs = L.reset(t);
            T gdt = T(0), gu = gys * L.Dv();
            for (int64_t n = 0; n < d.n; ++n) {
              dC[bg + n] += gys * ht[n];
              gh[n] += gys * Ct[n];
              dB[bg + n] += gh[n] * dt * u;
              gu += gh[n] * dt * Bt[n];
              gdt += gh[n] * Bt[n] * u;
              if (!rs) {
                const T hp = hprev ? hprev[n] : T(0);
                const T a = std::exp(dt * A[n]);
                gdt += gh[n] * A[n] * a * hp;
                dA[c * d.n + n] += gh[n] * dt * a * hp;
                gh[n] *= a;
              } else {
                gh[n] = T(0);
              }
            }
            du[i] = gu;
            const T gdr = in.delta_softplus ? gdt * sigmoid(L.dt_raw(t)) : gdt;
            ddelta[i] = gdr;
            ddb_acc += gdr;
          }
          if (gr.dinitial_state) {
            T* di = gr.dinitial_state->ptr<T>() + (b * d.c + c) * d.n;
            for (int64_t n = 0; n < d.n; ++n) di[n] = gh[n];
          }
          if (in.D) gr.dD->ptr<T>()[c] += dD_acc;
          if (in.delta_bias) gr.ddelta_bias->ptr<T>()[c] += ddb_acc;
        }
      }
    });
  });
}

}  // namespace braid
