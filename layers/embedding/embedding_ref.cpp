#include <algorithm>
#include <cstring>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/embedding/embedding.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

// The rows of W in the vocabulary: [v0, v0 + rows) of vocab (vocab 0: all of them).
void check_embedding(const Tensor& tokens, const Tensor& w, const Tensor& y, int64_t v0,
                     int64_t vocab) {
  BRAID_CHECK(tokens.ndim == 2 && tokens.dtype == DType::i32 && w.ndim == 2,
              "embedding: expects tokens [B,T] i32 and W [V,D]; got ", tokens.describe(), ", ",
              w.describe());
  check_shape(y, {tokens.size(0), tokens.size(1), w.size(1)});
  check_same_dtype(w, y);
  require_host("embedding", {&tokens, &w, &y});
  const int32_t* tok = tokens.ptr<int32_t>();
  const int64_t n = tokens.numel(), v = vocab > 0 ? vocab : w.size(0);
  BRAID_CHECK(v0 >= 0 && v0 + w.size(0) <= v, "embedding: rows [", v0, ", ", v0 + w.size(0),
              ") of ", w.describe(), " are outside the vocabulary [0, ", v, ")");
  for (int64_t i = 0; i < n; ++i)
    BRAID_CHECK(tok[i] >= 0 && tok[i] < v, "embedding: token id ", tok[i], " at position ", i,
                " of ", tokens.describe(), " is outside the vocabulary [0, ", v, ")");
}

}  // namespace

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y,
                       int64_t vocab_start, int64_t vocab_size) {
  check_embedding(tokens, weight, y, vocab_start, vocab_size);
  const int64_t n = tokens.numel(), d = weight.size(1), rows = weight.size(0);
  dispatch_float(weight.dtype, "embedding", [&]<typename T>() {
    const int32_t* tok = tokens.ptr<int32_t>();
    const T* w = weight.ptr<T>();
    T* out = y.ptr<T>();
    parallel_for(n, [&](int64_t i) {
      const int64_t r = tok[i] - vocab_start;
      if (r >= 0 && r < rows)
        std::memcpy(out + i * d, w + r * d, sizeof(T) * d);
      else
        std::fill(out + i * d, out + (i + 1) * d, T(0));
    });
  });
}

void embedding_backward(const Tensor& tokens, const Tensor& dy, const Tensor& dweight,
                        int64_t vocab_start, int64_t vocab_size) {
  check_embedding(tokens, dweight, dy, vocab_start, vocab_size);
  const int64_t n = tokens.numel(), d = dweight.size(1), rows = dweight.size(0);
  std::vector<int32_t> local(n);  // the row of each token in W, -1 outside it
  const int32_t* tok = tokens.ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = tok[i] - vocab_start;
    local[i] = r >= 0 && r < rows ? int32_t(r) : -1;
  }
  dispatch_float(dweight.dtype, "embedding", [&]<typename T>() {
    scatter_add_rows(dy.ptr<T>(), local.data(), n, d, dweight.ptr<T>());
  });
}

}  // namespace braid
