#include <cstring>

#include "layers/common/op_common.h"
#include "layers/embedding/embedding.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_embedding(const Tensor& tokens, const Tensor& w, const Tensor& y) {
  BRAID_CHECK(tokens.ndim == 2 && tokens.dtype == DType::i32 && w.ndim == 2,
              "embedding: expects tokens [B,T] i32 and W [V,D]; got ", tokens.describe(), ", ",
              w.describe());
  check_shape(y, {tokens.size(0), tokens.size(1), w.size(1)});
  check_same_dtype(w, y);
  require_host("embedding", {&tokens, &w, &y});
  const int32_t* tok = tokens.ptr<int32_t>();
  const int64_t n = tokens.numel(), v = w.size(0);
  for (int64_t i = 0; i < n; ++i)
    BRAID_CHECK(tok[i] >= 0 && tok[i] < v, "embedding: token id ", tok[i], " at position ", i,
                " of ", tokens.describe(), " is outside the vocabulary [0, ", v, ")");
}

}  // namespace

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y) {
  check_embedding(tokens, weight, y);
  const int64_t n = tokens.numel(), d = weight.size(1);
  dispatch_float(weight.dtype, "embedding", [&]<typename T>() {
    const int32_t* tok = tokens.ptr<int32_t>();
    const T* w = weight.ptr<T>();
    T* out = y.ptr<T>();
    parallel_for(n, [&](int64_t i) { std::memcpy(out + i * d, w + tok[i] * d, sizeof(T) * d); });
  });
}

void embedding_backward(const Tensor& tokens, const Tensor& dy, const Tensor& dweight) {
  check_embedding(tokens, dweight, dy);
  const int64_t n = tokens.numel(), d = dweight.size(1);
  dispatch_float(dweight.dtype, "embedding", [&]<typename T>() {
    scatter_add_rows(dy.ptr<T>(), tokens.ptr<int32_t>(), n, d, dweight.ptr<T>());
  });
}

}  // namespace braid
