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

// GPU tensors: shapes, dtypes and the row range (the ids stay on the device).
// y (the lookup's output or the backward's dy) has W's dtype, or is bf16 with an f32 dW when
// mixed_ok (the backward of mixed precision).
void check_embedding_gpu(const Tensor& tokens, const Tensor& w, const Tensor& y, int64_t v0,
                         int64_t vocab, bool mixed_ok = false) {
#if !defined(BRAID_WITH_CUDA)
  (void)tokens, (void)w, (void)y, (void)v0, (void)vocab, (void)mixed_ok;
  BRAID_FAIL("embedding: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#else
  BRAID_CHECK(tokens.ndim == 2 && tokens.dtype == DType::i32 && w.ndim == 2,
              "embedding: expects tokens [B,T] i32 and W [V,D]; got ", tokens.describe(), ", ",
              w.describe());
  check_shape(y, {tokens.size(0), tokens.size(1), w.size(1)});
  if (!(mixed_ok && w.dtype == DType::f32 && y.dtype == DType::bf16)) check_same_dtype(w, y);
  BRAID_CHECK(w.dtype == DType::bf16 || w.dtype == DType::f32,
              "embedding (CUDA): W must be bf16 or f32, got ", w.describe());
  require_gpu("embedding", {&tokens, &w, &y});
  const int64_t v = vocab > 0 ? vocab : w.size(0);
  BRAID_CHECK(v0 >= 0 && v0 + w.size(0) <= v && w.size(0) < (int64_t(1) << 30), "embedding: rows [",
              v0, ", ", v0 + w.size(0), ") of ", w.describe(), " are outside the vocabulary [0, ",
              v, ")");
  BRAID_CHECK(tokens.numel() < (int64_t(1) << 31), "embedding (CUDA): too many tokens");
#endif
}

}  // namespace

int64_t embedding_workspace_bytes(const Tensor& tokens, int64_t rows) {
  if (tokens.device != Device::cuda) return 0;
#if defined(BRAID_WITH_CUDA)
  return embedding_backward_workspace_bytes_cuda(tokens.numel(), rows);
#else
  (void)rows;
  return 0;
#endif
}

void embedding_forward(const Tensor& tokens, const Tensor& weight, const Tensor& y,
                       int64_t vocab_start, int64_t vocab_size, void* stream) {
  if (weight.device == Device::cuda) {
    check_embedding_gpu(tokens, weight, y, vocab_start, vocab_size);
#if defined(BRAID_WITH_CUDA)
    embedding_forward_cuda(tokens.ptr<int32_t>(), weight.data, y.data, tokens.numel(),
                           weight.size(1), vocab_start, weight.size(0), weight.dtype == DType::bf16,
                           stream);
#endif
    return;
  }
  (void)stream;
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
                        int64_t vocab_start, int64_t vocab_size, const Tensor* workspace,
                        void* stream) {
  if (dweight.device == Device::cuda) {
    check_embedding_gpu(tokens, dweight, dy, vocab_start, vocab_size, true);
#if defined(BRAID_WITH_CUDA)
    const int64_t need = embedding_workspace_bytes(tokens, dweight.size(0));
    BRAID_CHECK(
        workspace && workspace->device == Device::cuda && workspace->nbytes() >= size_t(need),
        "embedding (CUDA): the backward needs a GPU workspace of ", need, " bytes");
    embedding_backward_cuda(tokens.ptr<int32_t>(), dy.data, dweight.data, tokens.numel(),
                            dweight.size(1), vocab_start, dweight.size(0), dy.dtype == DType::bf16,
                            dweight.dtype == DType::bf16, workspace->data, stream);
#endif
    return;
  }
  (void)workspace, (void)stream;
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
