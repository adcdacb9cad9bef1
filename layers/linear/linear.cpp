#include "layers/linear/linear.h"

#include "layers/common/op_common.h"

namespace braid {
namespace {

void check_linear(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y) {
  BRAID_CHECK(x.ndim == 2 && w.ndim == 2 && y.ndim == 2,
              "linear: expects x [M,I], W [O,I], y [M,O]; got ", x.describe(), ", ", w.describe(),
              ", ", y.describe());
  const int64_t m = x.size(0), in = x.size(1), out = w.size(0);
  check_shape(w, {out, in});
  check_shape(y, {m, out});
  if (bias) check_shape(*bias, {out});
  check_same_dtype(x, w);
  if (bias) check_same_dtype(x, *bias);
  if (x.device != Device::cuda) {
    check_same_dtype(x, y);
    require_host("linear", {&x, &w, bias, &y});
  }
}

// On the GPU, an output (y, dW) may be f32 with bf16 operands (f32 accumulation is kept).
void check_gpu_output(const Tensor& x, const Tensor& out) {
  BRAID_CHECK(out.dtype == x.dtype || out.dtype == DType::f32, "linear (CUDA): ", out.describe(),
              " must be ", dtype_name(x.dtype), " or f32");
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                    const GemmContext* gemm) {
  check_linear(x, w, bias, y);
  if (x.device == Device::cuda) {
    check_gpu_output(x, y);
    BRAID_CHECK(!bias || y.dtype == x.dtype, "linear (CUDA): a bias needs y in ",
                dtype_name(x.dtype));
    return linear_forward_gpu(x, w, bias, y, gemm);
  }
  const int64_t m = x.size(0), in = x.size(1), out = w.size(0);
  dispatch_float(x.dtype, "linear", [&]<typename T>() {
    ref::matmul_nt(x.ptr<T>(), w.ptr<T>(), y.ptr<T>(), m, out, in, false);
    if (bias) {
      const T* b = bias->ptr<T>();
      T* yp = y.ptr<T>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < out; ++j) yp[i * out + j] += b[j];
    }
  });
}

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor* dx,
                     const Tensor& dw, const Tensor* dbias, const GemmContext* gemm,
                     bool accumulate_dx) {
  check_linear(x, w, dbias, dy);
  check_shape(dw, {w.size(0), w.size(1)});
  if (dx) check_shape(*dx, {x.size(0), x.size(1)});
  if (x.device == Device::cuda) {
    check_same_dtype(x, dy);
    if (dx) check_same_dtype(x, *dx);
    check_gpu_output(x, dw);
    return linear_backward_gpu(x, w, dy, dx, dw, dbias, gemm, accumulate_dx);
  }
  check_same_dtype(x, dw);
  if (dx) check_same_dtype(x, *dx);
  require_host("linear", {&dw, dx});
  const int64_t m = x.size(0), in = x.size(1), out = w.size(0);
  dispatch_float(x.dtype, "linear", [&]<typename T>() {
    if (dx) ref::matmul_nn(dy.ptr<T>(), w.ptr<T>(), dx->ptr<T>(), m, in, out, accumulate_dx);
    ref::matmul_tn_acc(dy.ptr<T>(), x.ptr<T>(), dw.ptr<T>(), out, in, m);
    if (dbias) {
      T* db = dbias->ptr<T>();
      const T* g = dy.ptr<T>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < out; ++j) db[j] += g[i * out + j];
    }
  });
}

}  // namespace braid
