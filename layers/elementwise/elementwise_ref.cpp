#include <cmath>
#include <cstring>

#include "layers/common/op_common.h"
#include "layers/elementwise/elementwise.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_same(const char* op, const Tensor& a, const Tensor& b) {
  BRAID_CHECK(a.numel() == b.numel() && a.dtype == b.dtype, op, ": ", a.describe(), " and ",
              b.describe(), " must have the same size and dtype");
  require_host(op, {&a, &b});
}

}  // namespace

void zero_fill(const Tensor& y) {
  require_host("zero_fill", {&y});
  std::memset(y.data, 0, y.nbytes());
}

void add_into(const Tensor& y, const Tensor& x) {
  check_same("add_into", y, x);
  dispatch_float(y.dtype, "add_into", [&]<typename T>() {
    T* yp = y.ptr<T>();
    const T* xp = x.ptr<T>();
    constexpr int64_t kBlock = 4096;
    const int64_t n = y.numel();
    parallel_for((n + kBlock - 1) / kBlock, [&](int64_t b) {
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) yp[i] += xp[i];
    });
  });
}

void neg_exp(const Tensor& a_log, const Tensor& a) {
  check_same("neg_exp", a_log, a);
  dispatch_float(a.dtype, "neg_exp", [&]<typename T>() {
    const T* lp = a_log.ptr<T>();
    T* ap = a.ptr<T>();
    for (int64_t i = 0; i < a.numel(); ++i) ap[i] = -std::exp(lp[i]);
  });
}

void neg_exp_backward(const Tensor& a, const Tensor& da, const Tensor& da_log) {
  check_same("neg_exp_backward", a, da);
  check_same("neg_exp_backward", a, da_log);
  dispatch_float(a.dtype, "neg_exp_backward", [&]<typename T>() {
    const T *ap = a.ptr<T>(), *g = da.ptr<T>();
    T* out = da_log.ptr<T>();
    for (int64_t i = 0; i < a.numel(); ++i) out[i] += g[i] * ap[i];
  });
}

}  // namespace braid
