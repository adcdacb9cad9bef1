#include "layers/causal_conv1d/causal_conv1d.h"
#include "layers/causal_conv1d/causal_conv1d_gpu.h"
#include "layers/common/op_common.h"
#include "runtime/parallel_for.h"

namespace braid {

ConvDims causal_conv1d_dims(const Conv1dInputs& in) {
  BRAID_CHECK(in.x && in.w, "causal_conv1d: x and w are required");
  BRAID_CHECK(in.x->ndim == 3 && in.w->ndim == 2,
              "causal_conv1d: expects x [B,T,C] and w [C,W]; got ", in.x->describe(), ", ",
              in.w->describe());
  const ConvDims d{in.x->size(0), in.x->size(1), in.x->size(2), in.w->size(1)};
  BRAID_CHECK(d.t > 0, "causal_conv1d: empty sequence in ", in.x->describe());
  BRAID_CHECK(d.w >= 2 && d.w <= 4, "causal_conv1d: width ", d.w, " must be 2, 3 or 4");
  check_shape(*in.w, {d.c, d.w});
  check_same_dtype(*in.x, *in.w);
  if (in.bias) check_shape(*in.bias, {d.c}), check_same_dtype(*in.x, *in.bias);
  if (in.seq_idx) {
    BRAID_CHECK(in.seq_idx->dtype == DType::i32, "causal_conv1d: seq_idx must be i32");
    check_shape(*in.seq_idx, {d.b, d.t});
  }
  if (in.initial_state)
    check_shape(*in.initial_state, {d.b, d.c, d.w - 1}), check_same_dtype(*in.x, *in.initial_state);
  return d;
}

namespace {

using Dims = ConvDims;

Dims check_conv(const Conv1dInputs& in) {
  const Dims d = causal_conv1d_dims(in);
  require_host("causal_conv1d", {in.x, in.w, in.bias, in.seq_idx, in.initial_state});
  return d;
}

// Where input position s (relative to row b) comes from, seen from output token t.
template <typename T>
struct Source {
  const Conv1dInputs& in;
  Dims d;
  const int32_t* seq;

  bool same_doc(int64_t b, int64_t s, int64_t t) const {
    return !seq || seq[b * d.t + (s < 0 ? 0 : s)] == seq[b * d.t + t];
  }
  // Value of xin(b, s, c) as seen from token t (0 across a document boundary).
  T value(int64_t b, int64_t s, int64_t c, int64_t t) const {
    if (!same_doc(b, s, t)) return T(0);
    if (s >= 0) return in.x->ptr<T>()[(b * d.t + s) * d.c + c];
    if (!in.initial_state) return T(0);
    return in.initial_state->ptr<T>()[(b * d.c + c) * (d.w - 1) + (d.w - 1 + s)];
  }
  T pre(int64_t b, int64_t t, int64_t c) const {
    const T* w = in.w->ptr<T>() + c * d.w;
    T acc = in.bias ? in.bias->ptr<T>()[c] : T(0);
    for (int64_t k = 0; k < d.w; ++k) acc += w[k] * value(b, t - d.w + 1 + k, c, t);
    return acc;
  }
};

constexpr int64_t kChannelBlock = 16;

}  // namespace

void causal_conv1d_forward(const Conv1dInputs& in, const Tensor& y, const Tensor* final_state) {
  if (in.x && in.x->device == Device::cuda) return causal_conv1d_forward_gpu(in, y, final_state);
  const Dims d = check_conv(in);
  check_shape(y, {d.b, d.t, d.c});
  check_same_dtype(*in.x, y);
  if (final_state) check_shape(*final_state, {d.b, d.c, d.w - 1});
  require_host("causal_conv1d", {&y, final_state});
  dispatch_float(in.x->dtype, "causal_conv1d", [&]<typename T>() {
    const Source<T> src{in, d, in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr};
    T* yp = y.ptr<T>();
    parallel_for(d.b * d.t, [&](int64_t bt) {
      const int64_t b = bt / d.t, t = bt % d.t;
      for (int64_t c = 0; c < d.c; ++c) {
        const T p = src.pre(b, t, c);
        yp[bt * d.c + c] = in.silu ? silu(p) : p;
      }
    });
    if (final_state) {
      T* fs = final_state->ptr<T>();
      for (int64_t b = 0; b < d.b; ++b)
        for (int64_t c = 0; c < d.c; ++c)
          for (int64_t j = 0; j < d.w - 1; ++j)
            fs[(b * d.c + c) * (d.w - 1) + j] = src.value(b, d.t - d.w + 1 + j, c, d.t - 1);
    }
  });
}

int64_t causal_conv1d_workspace_elems(const Conv1dInputs& in) {
  const Dims d = causal_conv1d_dims(in);
  return in.x->device == Device::cuda ? conv1d_partial_elems(d.b, d.t, d.c, d.w) : 0;
}

void causal_conv1d_backward(const Conv1dInputs& in, const Tensor& dy, const Tensor* dfinal_state,
                            const Conv1dGrads& g, const Tensor* workspace) {
  if (in.x && in.x->device == Device::cuda)
    return causal_conv1d_backward_gpu(in, dy, dfinal_state, g, workspace);
  const Dims d = check_conv(in);
  BRAID_CHECK(g.dx && g.dw, "causal_conv1d_backward: dx and dw are required");
  check_shape(dy, {d.b, d.t, d.c});
  check_shape(*g.dx, {d.b, d.t, d.c});
  check_shape(*g.dw, {d.c, d.w});
  if (g.dbias) check_shape(*g.dbias, {d.c});
  if (g.dinitial_state) check_shape(*g.dinitial_state, {d.b, d.c, d.w - 1});
  if (dfinal_state) check_shape(*dfinal_state, {d.b, d.c, d.w - 1});
  require_host("causal_conv1d", {&dy, g.dx, g.dw, g.dbias, g.dinitial_state, dfinal_state});
  dispatch_float(in.x->dtype, "causal_conv1d", [&]<typename T>() {
    const Source<T> src{in, d, in.seq_idx ? in.seq_idx->ptr<int32_t>() : nullptr};
    const T *gy = dy.ptr<T>(), *w = in.w->ptr<T>();
    T *dx = g.dx->ptr<T>(), *dw = g.dw->ptr<T>();
    T* dinit = g.dinitial_state ? g.dinitial_state->ptr<T>() : nullptr;
    const int64_t nblk = (d.c + kChannelBlock - 1) / kChannelBlock;
    // Each channel block owns its columns of dx, dinit, dw and dbias: no races, fixed order.
    parallel_for(nblk, [&](int64_t blk) {
      const int64_t c0 = blk * kChannelBlock, c1 = std::min(d.c, c0 + kChannelBlock);
      for (int64_t b = 0; b < d.b; ++b) {
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t t = 0; t < d.t; ++t) dx[(b * d.t + t) * d.c + c] = T(0);
          if (dinit)
            for (int64_t j = 0; j < d.w - 1; ++j) dinit[(b * d.c + c) * (d.w - 1) + j] = T(0);
        }
        for (int64_t t = 0; t < d.t; ++t) {
          for (int64_t c = c0; c < c1; ++c) {
            T gp = gy[(b * d.t + t) * d.c + c];
            if (in.silu) gp *= silu_grad(src.pre(b, t, c));
            if (g.dbias) g.dbias->ptr<T>()[c] += gp;
            for (int64_t k = 0; k < d.w; ++k) {
              const int64_t s = t - d.w + 1 + k;
              if (!src.same_doc(b, s, t)) continue;
              dw[c * d.w + k] += gp * src.value(b, s, c, t);
              if (s >= 0) {
                dx[(b * d.t + s) * d.c + c] += gp * w[c * d.w + k];
              } else if (dinit) {
                dinit[(b * d.c + c) * (d.w - 1) + (d.w - 1 + s)] += gp * w[c * d.w + k];
              }
            }
          }
        }
        if (dfinal_state) {
          const T* gf = dfinal_state->ptr<T>();
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t j = 0; j < d.w - 1; ++j) {
              const int64_t s = d.t - d.w + 1 + j;
              if (!src.same_doc(b, s, d.t - 1)) continue;
              const T gv = gf[(b * d.c + c) * (d.w - 1) + j];
              if (s >= 0)
                dx[(b * d.t + s) * d.c + c] += gv;
              else if (dinit)
                dinit[(b * d.c + c) * (d.w - 1) + (d.w - 1 + s)] += gv;
            }
        }
      }
    });
  });
}

}  // namespace braid
