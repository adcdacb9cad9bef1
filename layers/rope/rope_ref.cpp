#include <cmath>

#include "layers/common/op_common.h"
#include "layers/rope/rope.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void rotate(const Tensor& x, const Tensor& positions, double theta, const Tensor& y, double sign,
            void* stream) {
  BRAID_CHECK(x.ndim == 4 && x.size(3) % 2 == 0, "rope: expects x [B,T,H,P] with even P, got ",
              x.describe());
  BRAID_CHECK(theta > 0, "rope: theta must be positive, got ", theta);
  const int64_t b = x.size(0), t = x.size(1), h = x.size(2), p = x.size(3), half = p / 2;
  check_shape(y, {b, t, h, p});
  check_same_dtype(x, y);
  BRAID_CHECK(positions.dtype == DType::i32, "rope: positions must be i32");
  check_shape(positions, {b, t});
  if (x.device == Device::cuda) {
#if !defined(BRAID_WITH_CUDA)
    (void)stream;
    BRAID_FAIL("rope: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
    BRAID_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f32,
                "rope (CUDA): tensors must be bf16 or f32, got ", x.describe());
    BRAID_CHECK(p % 4 == 0, "rope (CUDA): head dim ", p, " must be a multiple of 4");
    require_gpu("rope", {&x, &positions, &y});
    return rope_cuda(x.data, y.data, positions.ptr<int32_t>(), b * t, h, p, theta,
                     x.dtype == DType::bf16, sign < 0, stream);
#endif
  }
  (void)stream;
  require_host("rope", {&x, &positions, &y});
  dispatch_float(x.dtype, "rope", [&]<typename T>() {
    const int32_t* pos = positions.ptr<int32_t>();
    parallel_for(b * t, [&](int64_t bt) {
      for (int64_t i = 0; i < half; ++i) {
        const double ang = pos[bt] * std::pow(theta, -2.0 * double(i) / double(p));
        const T c = T(std::cos(ang)), s = T(sign * std::sin(ang));
        for (int64_t hh = 0; hh < h; ++hh) {
          const T* xr = x.ptr<T>() + (bt * h + hh) * p;
          T* yr = y.ptr<T>() + (bt * h + hh) * p;
          const T x1 = xr[i], x2 = xr[i + half];
          yr[i] = x1 * c - x2 * s;
          yr[i + half] = x2 * c + x1 * s;
        }
      }
    });
  });
}

}  // namespace

void rope_forward(const Tensor& x, const Tensor& positions, double theta, const Tensor& y,
                  void* stream) {
  rotate(x, positions, theta, y, 1.0, stream);
}

void rope_backward(const Tensor& dy, const Tensor& positions, double theta, const Tensor& dx,
                   void* stream) {
  rotate(dy, positions, theta, dx, -1.0, stream);
}

}  // namespace braid
