#include <algorithm>
#include <cmath>
#include <vector>

#include "layers/common/op_common.h"
#include "layers/cross_entropy/cross_entropy.h"
#include "runtime/parallel_for.h"

namespace braid {

namespace {

// Shapes, dtypes and devices of the arguments, and every target in [-1, vocab).
void check_args(const Tensor& logits, const Tensor& targets, const Tensor* dlogits, int64_t vocab) {
  BRAID_CHECK(logits.ndim == 2, "cross_entropy: logits must be [M,V], got ", logits.describe());
  const int64_t m = logits.size(0);
  BRAID_CHECK(targets.dtype == DType::i32, "cross_entropy: targets must be i32, got ",
              targets.describe());
  check_shape(targets, {m});
  if (dlogits) {
    check_shape(*dlogits, {m, logits.size(1)});
    check_same_dtype(logits, *dlogits);
  }
  require_host("cross_entropy", {&logits, &targets, dlogits});
  const int32_t* tgt = targets.ptr<int32_t>();
  for (int64_t i = 0; i < m; ++i)
    BRAID_CHECK(tgt[i] >= -1 && tgt[i] < vocab, "cross_entropy: target ", tgt[i], " of row ", i,
                " is outside [-1, ", vocab, ")");
}

}  // namespace

LossSum cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor* dlogits,
                      double grad_scale) {
  check_args(logits, targets, dlogits, logits.ndim == 2 ? logits.size(1) : 0);
  const int64_t m = logits.size(0), v = logits.size(1);
  const int32_t* tgt = targets.ptr<int32_t>();
  LossSum out;
  dispatch_float(logits.dtype, "cross_entropy", [&]<typename T>() {
    const T* lp = logits.ptr<T>();
    T* dp = dlogits ? dlogits->ptr<T>() : nullptr;
    // Rows are processed in blocks of 64; block sums are added serially in block order, so the
    // total does not depend on the thread count.
    double total = 0;
    int64_t count = 0;
    constexpr int64_t kRows = 64;
    const int64_t nblk = (m + kRows - 1) / kRows;
    double partial[1024];
    for (int64_t b0 = 0; b0 < nblk; b0 += 1024) {
      const int64_t nb = std::min<int64_t>(1024, nblk - b0);
      parallel_for(nb, [&](int64_t bi) {
        double s = 0;
        const int64_t r0 = (b0 + bi) * kRows, r1 = std::min(m, r0 + kRows);
        for (int64_t i = r0; i < r1; ++i) {
          const T* row = lp + i * v;
          T mx = row[0];
          for (int64_t j = 1; j < v; ++j) mx = row[j] > mx ? row[j] : mx;
          double se = 0;
          for (int64_t j = 0; j < v; ++j) se += std::exp(double(row[j] - mx));
          const double lse = double(mx) + std::log(se);
          if (tgt[i] >= 0) s += lse - double(row[tgt[i]]);
          if (dp) {
            T* drow = dp + i * v;
            if (tgt[i] < 0) {
              for (int64_t j = 0; j < v; ++j) drow[j] = T(0);
            } else {
              for (int64_t j = 0; j < v; ++j)
                drow[j] = T(grad_scale * std::exp(double(row[j]) - lse));
              drow[tgt[i]] -= T(grad_scale);
            }
          }
        }
        partial[bi] = s;
      });
      for (int64_t bi = 0; bi < nb; ++bi) total += partial[bi];
    }
    for (int64_t i = 0; i < m; ++i) count += tgt[i] >= 0;
    out = {total, count};
  });
  return out;
}

void cross_entropy_rows(const Tensor& logits, const Tensor& targets, const Tensor* dlogits,
                        double grad_scale, const Tensor& row_loss, void* stream) {
  BRAID_CHECK(logits.ndim == 2, "cross_entropy: logits must be [M,V], got ", logits.describe());
  const int64_t m = logits.size(0), v = logits.size(1);
  BRAID_CHECK(targets.dtype == DType::i32, "cross_entropy: targets must be i32, got ",
              targets.describe());
  check_shape(targets, {m});
  check_shape(row_loss, {m, 2});
  BRAID_CHECK(row_loss.dtype == DType::f32, "cross_entropy: row_loss must be f32");
  BRAID_CHECK(logits.dtype == DType::bf16 || logits.dtype == DType::f32,
              "cross_entropy (CUDA): logits must be bf16 or f32, got ", logits.describe());
  if (dlogits) check_shape(*dlogits, {m, v}), check_same_dtype(logits, *dlogits);
  require_gpu("cross_entropy", {&logits, &targets, dlogits, &row_loss});
#if defined(BRAID_WITH_CUDA)
  cross_entropy_rows_cuda(logits.data, targets.ptr<int32_t>(), dlogits ? dlogits->data : nullptr,
                          float(grad_scale), row_loss.ptr<float>(), m, v,
                          logits.dtype == DType::bf16, stream);
#else
  (void)grad_scale, (void)stream;
  BRAID_FAIL("cross_entropy: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#endif
}

void cross_entropy_rows_vocab_parallel(const Tensor& logits, const Tensor& targets,
                                       const Tensor* dlogits, double grad_scale,
                                       const Tensor& row_loss, int64_t vocab_start,
                                       int64_t vocab_size, Communicator& group,
                                       const Tensor& stats) {
  BRAID_CHECK(logits.ndim == 2, "cross_entropy: logits must be [M,V], got ", logits.describe());
  const int64_t m = logits.size(0), v = logits.size(1), v0 = vocab_start;
  BRAID_CHECK(targets.dtype == DType::i32, "cross_entropy: targets must be i32, got ",
              targets.describe());
  check_shape(targets, {m});
  check_shape(row_loss, {m, 2});
  check_shape(stats, {4, m});
  BRAID_CHECK(row_loss.dtype == DType::f32 && stats.dtype == DType::f32,
              "cross_entropy: row_loss and stats must be f32");
  BRAID_CHECK(logits.dtype == DType::bf16 || logits.dtype == DType::f32,
              "cross_entropy (CUDA): logits must be bf16 or f32, got ", logits.describe());
  BRAID_CHECK(v0 >= 0 && v0 + v <= vocab_size, "cross_entropy: columns [", v0, ", ", v0 + v,
              ") are outside the vocabulary [0, ", vocab_size, ")");
  if (dlogits) check_shape(*dlogits, {m, v}), check_same_dtype(logits, *dlogits);
  require_gpu("cross_entropy", {&logits, &targets, dlogits, &row_loss, &stats});
#if defined(BRAID_WITH_CUDA)
  const bool bf16 = logits.dtype == DType::bf16;
  float* st = stats.ptr<float>();
  ce_vocab_parallel_stats_cuda(logits.data, targets.ptr<int32_t>(), m, v, v0, bf16, st, nullptr);
  group.all_reduce(stats.slice(0, 1, 1), ReduceOp::max);  // the global maxima
  ce_vocab_parallel_rescale_cuda(st, m, nullptr);
  group.all_reduce(stats.slice(0, 2, 2), ReduceOp::sum);  // sums of exponentials, target logits
  ce_vocab_parallel_finish_cuda(logits.data, targets.ptr<int32_t>(),
                                dlogits ? dlogits->data : nullptr, float(grad_scale), st,
                                row_loss.ptr<float>(), m, v, v0, vocab_size, bf16, nullptr);
#else
  (void)grad_scale, (void)group;
  BRAID_FAIL("cross_entropy: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#endif
}

LossSum read_row_losses(const Tensor& row_loss, void* stream) {
  BRAID_CHECK(row_loss.ndim == 2 && row_loss.size(1) == 2 && row_loss.dtype == DType::f32,
              "cross_entropy: row_loss must be [M,2] f32, got ", row_loss.describe());
  require_gpu("cross_entropy", {&row_loss});
  const int64_t m = row_loss.size(0);
  std::vector<float> host(2 * size_t(m));
#if defined(BRAID_WITH_CUDA)
  copy_row_losses_cuda(row_loss.ptr<float>(), host.data(), m, stream);
#else
  (void)stream;
  BRAID_FAIL("cross_entropy: tensors are on the GPU but this build has no CUDA (-DBRAID_CUDA=ON)");
#endif
  LossSum out;
  for (int64_t i = 0; i < m; ++i) {
    BRAID_CHECK(host[2 * i + 1] >= 0, "cross_entropy: the target of row ", i,
                " is outside [-1, vocabulary)");
    if (host[2 * i + 1] > 0) out.sum += host[2 * i], ++out.count;
  }
  return out;
}

LossSum cross_entropy_vocab_parallel(const Tensor& logits, const Tensor& targets,
                                     const Tensor* dlogits, double grad_scale, int64_t vocab_start,
                                     int64_t vocab_size, Communicator& group) {
  check_args(logits, targets, dlogits, vocab_size);
  const int64_t m = logits.size(0), v = logits.size(1), v0 = vocab_start;
  BRAID_CHECK(v0 >= 0 && v0 + v <= vocab_size, "cross_entropy: columns [", v0, ", ", v0 + v,
              ") are outside the vocabulary [0, ", vocab_size, ")");
  const int32_t* tgt = targets.ptr<int32_t>();
  std::vector<double> mx(m), se(m), tl(m);
  auto reduce = [&](std::vector<double>& x, ReduceOp op) {
    group.all_reduce(Tensor::contiguous_view(x.data(), DType::f64, Device::cpu, {m}, "ce"), op);
  };
  LossSum out;
  dispatch_float(logits.dtype, "cross_entropy", [&]<typename T>() {
    const T* lp = logits.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      double x = double(lp[i * v]);
      for (int64_t j = 1; j < v; ++j) x = std::max(x, double(lp[i * v + j]));
      mx[i] = x;
    });
    reduce(mx, ReduceOp::max);
    parallel_for(m, [&](int64_t i) {
      double s = 0;
      for (int64_t j = 0; j < v; ++j) s += std::exp(double(lp[i * v + j]) - mx[i]);
      se[i] = s;
      const int64_t c = tgt[i] - v0;
      tl[i] = tgt[i] >= 0 && c >= 0 && c < v ? double(lp[i * v + c]) : 0.0;
    });
    reduce(se, ReduceOp::sum);
    reduce(tl, ReduceOp::sum);
    for (int64_t i = 0; i < m; ++i)  // in row order: the same total on every rank
      if (tgt[i] >= 0) out.sum += mx[i] + std::log(se[i]) - tl[i], ++out.count;
    if (!dlogits) return;
    T* dp = dlogits->ptr<T>();
    parallel_for(m, [&](int64_t i) {
      T* drow = dp + i * v;
      const int64_t c = tgt[i] - v0;
      if (tgt[i] < 0) {
        std::fill(drow, drow + v, T(0));
        return;
      }
      const double lse = mx[i] + std::log(se[i]);
      for (int64_t j = 0; j < v; ++j)
        drow[j] = T(grad_scale * std::exp(double(lp[i * v + j]) - lse));
      if (c >= 0 && c < v) drow[c] -= T(grad_scale);
    });
  });
  return out;
}

}  // namespace braid
