#include <cmath>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/ssd/ssd.h"
#include "layers/ssd/ssd_cuda.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

using Dims = SsdDims;

// Host inputs: every tensor of the activation dtype (f32 or f64).
Dims check_ssd(const SsdInputs& in) {
  const Dims d = ssd_dims(in);
  for (const Tensor* t : {in.dt, in.A, in.B, in.C, in.D, in.dt_bias, in.initial_state})
    if (t) check_same_dtype(*in.x, *t);
  require_host("ssd",
               {in.x, in.dt, in.A, in.B, in.C, in.D, in.dt_bias, in.seq_idx, in.initial_state});
  return d;
}

// Read-only access to one (b, h) lane.
template <typename T>
struct Lane {
  const SsdInputs& in;
  Dims d;
  int64_t b, h, g;

  T raw(int64_t t) const {
    return in.dt->ptr<T>()[(b * d.t + t) * d.h + h] + (in.dt_bias ? in.dt_bias->ptr<T>()[h] : T(0));
  }
  T sp(int64_t t) const { return in.dt_softplus ? softplus(raw(t)) : raw(t); }
  T dt(int64_t t) const {
    const T v = sp(t);
    return std::min(std::max(v, T(in.dt_min)), T(in.dt_max));
  }
  // d dt / d dt_raw
  T dt_grad(int64_t t) const {
    const T v = sp(t);
    if (v < T(in.dt_min) || v > T(in.dt_max)) return T(0);
    return in.dt_softplus ? sigmoid(raw(t)) : T(1);
  }
  T A() const { return in.A->ptr<T>()[h]; }
  // D per head [H] or per channel [H,P].
  T Dv(int64_t p) const {
    if (!in.D) return T(0);
    return in.D->ndim == 1 ? in.D->ptr<T>()[h] : in.D->ptr<T>()[h * d.p + p];
  }
  const T* x(int64_t t) const { return in.x->ptr<T>() + ((b * d.t + t) * d.h + h) * d.p; }
  const T* Bt(int64_t t) const { return in.B->ptr<T>() + ((b * d.t + t) * d.g + g) * d.n; }
  const T* Ct(int64_t t) const { return in.C->ptr<T>() + ((b * d.t + t) * d.g + g) * d.n; }
  int32_t doc(int64_t t) const { return in.seq_idx ? in.seq_idx->ptr<int32_t>()[b * d.t + t] : 0; }
  const T* h0() const {
    return in.initial_state ? in.initial_state->ptr<T>() + (b * d.h + h) * d.p * d.n : nullptr;
  }
  T dotBC(int64_t t, int64_t s) const {
    T acc = T(0);
    for (int64_t n = 0; n < d.n; ++n) acc += Ct(t)[n] * Bt(s)[n];
    return acc;
  }
};

template <typename T>
T* lane_out(const Tensor& y, const Dims& d, int64_t b, int64_t t, int64_t h) {
  return y.ptr<T>() + ((b * d.t + t) * d.h + h) * d.p;
}

void check_outputs(const SsdInputs& in, const Dims& d, const Tensor& y, const Tensor* final_state) {
  check_shape(y, {d.b, d.t, d.h, d.p});
  check_same_dtype(*in.x, y);
  if (final_state) check_shape(*final_state, {d.b, d.h, d.p, d.n});
  require_host("ssd", {&y, final_state});
}

}  // namespace

SsdDims ssd_dims(const SsdInputs& in) {
  BRAID_CHECK(in.x && in.dt && in.A && in.B && in.C, "ssd: x, dt, A, B, C are required");
  BRAID_CHECK(in.x->ndim == 4 && in.B->ndim == 4, "ssd: expects x [B,T,H,P] and B [B,T,G,N]; got ",
              in.x->describe(), ", ", in.B->describe());
  const SsdDims d{in.x->size(0), in.x->size(1), in.x->size(2),
                  in.x->size(3), in.B->size(2), in.B->size(3)};
  BRAID_CHECK(d.t > 0, "ssd: empty sequence in ", in.x->describe());
  BRAID_CHECK(d.g >= 1 && d.h % d.g == 0, "ssd: groups ", d.g, " must divide heads ", d.h);
  BRAID_CHECK(in.chunk >= 1, "ssd: chunk size ", in.chunk, " must be positive");
  BRAID_CHECK(in.dt_min <= in.dt_max, "ssd: dt_min ", in.dt_min, " above dt_max ", in.dt_max);
  check_shape(*in.dt, {d.b, d.t, d.h});
  check_shape(*in.A, {d.h});
  check_shape(*in.B, {d.b, d.t, d.g, d.n});
  check_shape(*in.C, {d.b, d.t, d.g, d.n});
  if (in.D) {
    BRAID_CHECK(in.D->ndim == 1 || in.D->ndim == 2, "ssd: D must be [H] or [H,P], got ",
                in.D->describe());
    if (in.D->ndim == 1)
      check_shape(*in.D, {d.h});
    else
      check_shape(*in.D, {d.h, d.p});
  }
  if (in.dt_bias) check_shape(*in.dt_bias, {d.h});
  if (in.seq_idx) {
    BRAID_CHECK(in.seq_idx->dtype == DType::i32, "ssd: seq_idx must be i32");
    check_shape(*in.seq_idx, {d.b, d.t});
  }
  if (in.initial_state) check_shape(*in.initial_state, {d.b, d.h, d.p, d.n});
  return d;
}

void check_ssd_grads(const SsdInputs& in, const SsdDims& d, const Tensor& dy,
                     const Tensor* dfinal_state, const SsdGrads& gr) {
  BRAID_CHECK(gr.dx && gr.ddt && gr.dA && gr.dB && gr.dC,
              "ssd_backward: dx, ddt, dA, dB, dC are required");
  BRAID_CHECK(!in.D || gr.dD, "ssd_backward: dD is required when D is given");
  BRAID_CHECK(!in.dt_bias || gr.ddt_bias,
              "ssd_backward: ddt_bias is required when dt_bias is given");
  check_shape(dy, {d.b, d.t, d.h, d.p});
  check_shape(*gr.dx, {d.b, d.t, d.h, d.p});
  check_shape(*gr.ddt, {d.b, d.t, d.h});
  check_shape(*gr.dA, {d.h});
  check_shape(*gr.dB, {d.b, d.t, d.g, d.n});
  check_shape(*gr.dC, {d.b, d.t, d.g, d.n});
  if (in.D && in.D->ndim == 1) check_shape(*gr.dD, {d.h});
  if (in.D && in.D->ndim == 2) check_shape(*gr.dD, {d.h, d.p});
  if (in.dt_bias) check_shape(*gr.ddt_bias, {d.h});
  if (gr.dinitial_state) check_shape(*gr.dinitial_state, {d.b, d.h, d.p, d.n});
  if (dfinal_state) check_shape(*dfinal_state, {d.b, d.h, d.p, d.n});
}

int64_t ssd_forward_workspace_elems(const SsdInputs& in) {
  if (in.x && in.x->device == Device::cuda) return ssd_gpu_workspace_elems(in);
  const Dims d = check_ssd(in);
  return d.b * d.h * (d.p * d.n + 2 * std::min(in.chunk, d.t));
}

int64_t ssd_scratch_elems(const SsdInputs& in) {
  return in.x && in.x->device == Device::cuda ? ssd_gpu_scratch_elems(in) : 0;
}

int64_t ssd_backward_workspace_elems(const SsdInputs& in) {
  if (in.x && in.x->device == Device::cuda) return ssd_gpu_workspace_elems(in);
  const Dims d = check_ssd(in);
  return d.b * d.h * d.t * d.p * d.n + d.g * d.p * d.n;
}

void ssd_forward(const SsdInputs& in, const Tensor& y, const Tensor* final_state,
                 const Tensor& workspace) {
  if (in.x && in.x->device == Device::cuda) return ssd_forward_gpu(in, y, final_state, workspace);
  BRAID_CHECK(!in.y_scan, "ssd: y_scan is for GPU tensors; the CPU backward recomputes it");
  const Dims d = check_ssd(in);
  check_outputs(in, d, y, final_state);
  const int64_t q = std::min(in.chunk, d.t), per_lane = d.p * d.n + 2 * q;
  BRAID_CHECK(workspace.numel() >= d.b * d.h * per_lane && workspace.dtype == in.x->dtype,
              "ssd_forward: workspace ", workspace.describe(), " needs ", d.b * d.h * per_lane,
              " elements of ", dtype_name(in.x->dtype));
  require_host("ssd", {&workspace});
  dispatch_float(in.x->dtype, "ssd", [&]<typename T>() {
    parallel_for(d.b * d.h, [&](int64_t bh) {
      const int64_t b = bh / d.h, h = bh % d.h;
      const Lane<T> L{in, d, b, h, h / (d.h / d.g)};
      // Per-lane state S [P,N] and the chunk's cumulative log decays and step sizes [Q].
      T* S = workspace.ptr<T>() + bh * per_lane;
      T* cum = S + d.p * d.n;
      T* dts = cum + q;
      const T* h0 = L.h0();
      for (int64_t i = 0; i < d.p * d.n; ++i) S[i] = h0 ? h0[i] : T(0);
      int32_t state_doc = L.doc(0);
      for (int64_t c0 = 0; c0 < d.t; c0 += q) {
        const int64_t len = std::min(q, d.t - c0);
        T run = T(0);
        for (int64_t i = 0; i < len; ++i) {
          dts[i] = L.dt(c0 + i);
          run += dts[i] * L.A();
          cum[i] = run;
        }
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = c0 + i;
          T* yt = lane_out<T>(y, d, b, t, h);
          const T* xt = L.x(t);
          for (int64_t p = 0; p < d.p; ++p) yt[p] = L.Dv(p) * xt[p];
          if (L.doc(t) == state_doc) {  // contribution of the state entering the chunk
            const T decay = std::exp(cum[i]);
            const T* Ct = L.Ct(t);
            for (int64_t p = 0; p < d.p; ++p) {
              T acc = T(0);
              for (int64_t n = 0; n < d.n; ++n) acc += S[p * d.n + n] * Ct[n];
              yt[p] += decay * acc;
            }
          }
          for (int64_t j = 0; j <= i; ++j) {  // intra-chunk (quadratic) part
            const int64_t s = c0 + j;
            if (L.doc(s) != L.doc(t)) continue;
            const T w = L.dotBC(t, s) * std::exp(cum[i] - cum[j]) * dts[j];
            const T* xs = L.x(s);
            for (int64_t p = 0; p < d.p; ++p) yt[p] += w * xs[p];
          }
        }
        // State leaving the chunk.
        const int64_t last = c0 + len - 1;
        const T keep = L.doc(last) == state_doc ? std::exp(cum[len - 1]) : T(0);
        for (int64_t i = 0; i < d.p * d.n; ++i) S[i] *= keep;
        for (int64_t j = 0; j < len; ++j) {
          const int64_t s = c0 + j;
          if (L.doc(s) != L.doc(last)) continue;
          const T w = std::exp(cum[len - 1] - cum[j]) * dts[j];
          const T *xs = L.x(s), *Bs = L.Bt(s);
          for (int64_t p = 0; p < d.p; ++p)
            for (int64_t n = 0; n < d.n; ++n) S[p * d.n + n] += w * xs[p] * Bs[n];
        }
        state_doc = L.doc(last);
      }
      if (final_state) {
        T* fs = final_state->ptr<T>() + (b * d.h + h) * d.p * d.n;
        for (int64_t i = 0; i < d.p * d.n; ++i) fs[i] = S[i];
      }
    });
  });
}

void ssd_forward_quadratic(const SsdInputs& in, const Tensor& y, const Tensor* final_state) {
  const Dims d = check_ssd(in);
  check_outputs(in, d, y, final_state);
  dispatch_float(in.x->dtype, "ssd", [&]<typename T>() {
    parallel_for(d.b * d.h, [&](int64_t bh) {
      const int64_t b = bh / d.h, h = bh % d.h;
      const Lane<T> L{in, d, b, h, h / (d.h / d.g)};
      std::vector<T> cum(d.t), dts(d.t);
      T run = T(0);
      for (int64_t t = 0; t < d.t; ++t) {
        dts[t] = L.dt(t);
        run += dts[t] * L.A();
        cum[t] = run;
      }
      const T* h0 = L.h0();
      for (int64_t t = 0; t < d.t; ++t) {
        T* yt = lane_out<T>(y, d, b, t, h);
        for (int64_t p = 0; p < d.p; ++p) {
          T acc = L.Dv(p) * L.x(t)[p];
          if (h0 && L.doc(t) == L.doc(0)) {
            T hc = T(0);
            for (int64_t n = 0; n < d.n; ++n) hc += h0[p * d.n + n] * L.Ct(t)[n];
            acc += std::exp(cum[t]) * hc;
          }
          for (int64_t s = 0; s <= t; ++s)
            if (L.doc(s) == L.doc(t))
              acc += L.dotBC(t, s) * std::exp(cum[t] - cum[s]) * dts[s] * L.x(s)[p];
          yt[p] = acc;
        }
      }
      if (final_state) {
        T* fs = final_state->ptr<T>() + (b * d.h + h) * d.p * d.n;
        const int64_t last = d.t - 1;
        for (int64_t p = 0; p < d.p; ++p)
          for (int64_t n = 0; n < d.n; ++n) {
            T acc = (h0 && L.doc(last) == L.doc(0)) ? std::exp(cum[last]) * h0[p * d.n + n] : T(0);
            for (int64_t s = 0; s < d.t; ++s)
              if (L.doc(s) == L.doc(last))
                acc += std::exp(cum[last] - cum[s]) * dts[s] * L.x(s)[p] * L.Bt(s)[n];
            fs[p * d.n + n] = acc;
          }
      }
    });
  });
}

void ssd_backward(const SsdInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                  const SsdGrads& gr, const Tensor& workspace) {
  if (in.x && in.x->device == Device::cuda)
    return ssd_backward_gpu(in, dy, dfinal_state, gr, workspace);
  BRAID_CHECK(!in.y_scan, "ssd: y_scan is for GPU tensors; the CPU backward recomputes it");
  const Dims d = check_ssd(in);
  check_ssd_grads(in, d, dy, dfinal_state, gr);
  const int64_t lane = d.t * d.p * d.n;
  BRAID_CHECK(
      workspace.numel() >= d.b * d.h * lane + d.g * d.p * d.n && workspace.dtype == in.x->dtype,
      "ssd_backward: workspace ", workspace.describe(), " needs ",
      d.b * d.h * lane + d.g * d.p * d.n, " elements of ", dtype_name(in.x->dtype));
  require_host("ssd", {&dy, gr.dx, gr.ddt, gr.dA, gr.dB, gr.dC, gr.dD, gr.ddt_bias,
                       gr.dinitial_state, dfinal_state, &workspace});
  dispatch_float(in.x->dtype, "ssd", [&]<typename T>() {
    T *dB = gr.dB->ptr<T>(), *dC = gr.dC->ptr<T>();
    for (int64_t i = 0; i < gr.dB->numel(); ++i) dB[i] = T(0), dC[i] = T(0);
    const int64_t hpg = d.h / d.g, pn = d.p * d.n;
    // One task per group (it owns dB/dC of the group and dA/dD/ddt_bias of its heads); lanes are
    // visited in a fixed order, so gradients do not depend on the thread count.
    parallel_for(d.g, [&](int64_t g) {
      T* gh = workspace.ptr<T>() + d.b * d.h * lane + g * pn;
      for (int64_t b = 0; b < d.b; ++b) {
        for (int64_t h = g * hpg; h < (g + 1) * hpg; ++h) {
          const Lane<T> L{in, d, b, h, g};
          T* hs = workspace.ptr<T>() + (b * d.h + h) * lane;
          const T* h0 = L.h0();
          // Forward recurrence, keeping every state.
          for (int64_t t = 0; t < d.t; ++t) {
            const T dt = L.dt(t), a = std::exp(dt * L.A());
            const bool keep = t == 0 || L.doc(t) == L.doc(t - 1);
            const T* prev = t > 0 ? hs + (t - 1) * pn : h0;
            const T *xt = L.x(t), *Bt = L.Bt(t);
            for (int64_t p = 0; p < d.p; ++p)
              for (int64_t n = 0; n < d.n; ++n)
                hs[t * pn + p * d.n + n] =
                    (keep && prev ? a * prev[p * d.n + n] : T(0)) + dt * xt[p] * Bt[n];
          }
          const T* gf = dfinal_state ? dfinal_state->ptr<T>() + (b * d.h + h) * pn : nullptr;
          for (int64_t i = 0; i < pn; ++i) gh[i] = gf ? gf[i] : T(0);
          T dA_acc = T(0), ddb_acc = T(0);
          std::vector<T> dD_acc(d.p, T(0));
          for (int64_t t = d.t - 1; t >= 0; --t) {
            const T* gy = dy.ptr<T>() + ((b * d.t + t) * d.h + h) * d.p;
            const T *xt = L.x(t), *Bt = L.Bt(t), *Ct = L.Ct(t);
            const T* ht = hs + t * pn;
            const T dt = L.dt(t), a = std::exp(dt * L.A());
            const bool keep = t == 0 || L.doc(t) == L.doc(t - 1);
            const T* prev = t > 0 ? hs + (t - 1) * pn : h0;
            T* dCt = dC + ((b * d.t + t) * d.g + g) * d.n;
            T* dBt = dB + ((b * d.t + t) * d.g + g) * d.n;
            T* dxt = gr.dx->ptr<T>() + ((b * d.t + t) * d.h + h) * d.p;
            T gdt = T(0), gdecay = T(0);
            for (int64_t p = 0; p < d.p; ++p) {
              dD_acc[p] += gy[p] * xt[p];
              T gx = L.Dv(p) * gy[p];
              for (int64_t n = 0; n < d.n; ++n) {
                const int64_t i = p * d.n + n;
                dCt[n] += gy[p] * ht[i];
                gh[i] += gy[p] * Ct[n];
                gx += dt * gh[i] * Bt[n];
                dBt[n] += dt * gh[i] * xt[p];
                gdt += gh[i] * xt[p] * Bt[n];
                if (keep && prev) gdecay += gh[i] * prev[i];
              }
              dxt[p] = gx;
            }
            // h_t depends on dt through exp(dt A) h_{t-1} and dt x B^T.
            gdt += gdecay * a * L.A();
            dA_acc += gdecay * a * dt;
            for (int64_t i = 0; i < pn; ++i) gh[i] = keep ? gh[i] * a : T(0);
            const T gr_raw = gdt * L.dt_grad(t);
            gr.ddt->ptr<T>()[(b * d.t + t) * d.h + h] = gr_raw;
            ddb_acc += gr_raw;
          }
          if (gr.dinitial_state) {
            T* di = gr.dinitial_state->ptr<T>() + (b * d.h + h) * pn;
            for (int64_t i = 0; i < pn; ++i) di[i] = gh[i];
          }
          gr.dA->ptr<T>()[h] += dA_acc;
          if (in.D) {
            if (in.D->ndim == 1) {
              T sum = T(0);
              for (int64_t p = 0; p < d.p; ++p) sum += dD_acc[p];
              gr.dD->ptr<T>()[h] += sum;
            } else {
              for (int64_t p = 0; p < d.p; ++p) gr.dD->ptr<T>()[h * d.p + p] += dD_acc[p];
            }
          }
          if (in.dt_bias) gr.ddt_bias->ptr<T>()[h] += ddb_acc;
        }
      }
    });
  });
}

}  // namespace braid
