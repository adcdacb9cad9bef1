#include <cmath>
#include <limits>

#include "layers/attention/attention.h"
#include "layers/attention/attention_cuda.h"
#include "layers/common/op_common.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

using Dims = AttentionDims;

Dims check_attention(const AttentionInputs& in, const Tensor& o, const Tensor& lse) {
  const Dims d = attention_dims(in, o, lse);
  for (const Tensor* t : {in.k, in.v, &o, &lse}) check_same_dtype(*in.q, *t);
  require_host("attention", {in.q, in.k, in.v, in.seq_idx, &o, &lse});
  return d;
}

template <typename T>
struct Rows {
  const AttentionInputs& in;
  Dims d;
  int64_t b;
  const T* q(int64_t t, int64_t h) const {
    return in.q->ptr<T>() + ((b * d.t + t) * d.h + h) * d.p;
  }
  const T* k(int64_t s, int64_t hk) const {
    return in.k->ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
  }
  const T* v(int64_t s, int64_t hk) const {
    return in.v->ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
  }
  // First key position visible from query t (start of t's document).
  int64_t first(int64_t t) const {
    if (!in.seq_idx) return 0;
    const int32_t* s = in.seq_idx->ptr<int32_t>() + b * d.t;
    int64_t f = t;
    while (f > 0 && s[f - 1] == s[t]) --f;
    return f;
  }
  T score(int64_t t, int64_t h, int64_t s, int64_t hk) const {
    const T *qr = q(t, h), *kr = k(s, hk);
    T acc = T(0);
    for (int64_t i = 0; i < d.p; ++i) acc += qr[i] * kr[i];
    return acc * T(in.scale);
  }
};

}  // namespace

void attention_forward(const AttentionInputs& in, const Tensor& o, const Tensor& lse) {
  if (in.q && in.q->device == Device::cuda) return attention_forward_gpu(in, o, lse);
  const Dims d = check_attention(in, o, lse);
  dispatch_float(in.q->dtype, "attention", [&]<typename T>() {
    parallel_for(d.b * d.h * d.t, [&](int64_t i) {
      const int64_t b = i / (d.h * d.t), h = (i / d.t) % d.h, t = i % d.t, hk = h / (d.h / d.hk);
      if (in.rows && !in.rows->has(t)) return;
      const Rows<T> R{in, d, b};
      const int64_t s0 = R.first(t);
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t s = s0; s <= t; ++s) m = std::max(m, R.score(t, h, s, hk));
      T* out = o.ptr<T>() + ((b * d.t + t) * d.h + h) * d.p;
      for (int64_t p = 0; p < d.p; ++p) out[p] = T(0);
      T l = T(0);
      for (int64_t s = s0; s <= t; ++s) {
        const T e = std::exp(R.score(t, h, s, hk) - m);
        l += e;
        const T* vr = R.v(s, hk);
        for (int64_t p = 0; p < d.p; ++p) out[p] += e * vr[p];
      }
      for (int64_t p = 0; p < d.p; ++p) out[p] /= l;
      lse.ptr<T>()[(b * d.h + h) * d.t + t] = m + std::log(l);
    });
  });
}

void attention_backward(const AttentionInputs& in, const Tensor& o, const Tensor& lse,
                        const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  if (in.q && in.q->device == Device::cuda)
    return attention_backward_gpu(in, o, lse, dout, dq, dk, dv);
  const Dims d = check_attention(in, o, lse);
  check_shape(dout, {d.b, d.t, d.h, d.p});
  check_shape(dq, {d.b, d.t, d.h, d.p});
  check_shape(dk, {d.b, d.t, d.hk, d.p});
  check_shape(dv, {d.b, d.t, d.hk, d.p});
  require_host("attention", {&dout, &dq, &dk, &dv});
  dispatch_float(in.q->dtype, "attention", [&]<typename T>() {
    const int64_t group = d.h / d.hk;
    // One task per (b, KV head): it owns dk/dv of that head and dq of its query heads.
    parallel_for(d.b * d.hk, [&](int64_t i) {
      const int64_t b = i / d.hk, hk = i % d.hk;
      const Rows<T> R{in, d, b};
      for (int64_t s = 0; s < d.t; ++s) {
        T* dkr = dk.ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
        T* dvr = dv.ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
        for (int64_t p = 0; p < d.p; ++p) dkr[p] = T(0), dvr[p] = T(0);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t t = 0; t < d.t; ++t) {
          const int64_t row = (b * d.t + t) * d.h + h;
          const T *go = dout.ptr<T>() + row * d.p, *orow = o.ptr<T>() + row * d.p;
          T* dqr = dq.ptr<T>() + row * d.p;
          T Dt = T(0);
          for (int64_t p = 0; p < d.p; ++p) dqr[p] = T(0);
          if (in.rows && !in.rows->has(t)) continue;
          for (int64_t p = 0; p < d.p; ++p) Dt += go[p] * orow[p];
          const T l = lse.ptr<T>()[(b * d.h + h) * d.t + t];
          const T* qr = R.q(t, h);
          for (int64_t s = R.first(t); s <= t; ++s) {
            const T pr = std::exp(R.score(t, h, s, hk) - l);
            const T *kr = R.k(s, hk), *vr = R.v(s, hk);
            T dp = T(0);
            for (int64_t p = 0; p < d.p; ++p) dp += go[p] * vr[p];
            const T ds = pr * (dp - Dt) * T(in.scale);
            T* dkr = dk.ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
            T* dvr = dv.ptr<T>() + ((b * d.t + s) * d.hk + hk) * d.p;
            for (int64_t p = 0; p < d.p; ++p) {
              dqr[p] += ds * kr[p];
              dkr[p] += ds * qr[p];
              dvr[p] += pr * go[p];
            }
          }
        }
      }
    });
  });
}

}  // namespace braid
