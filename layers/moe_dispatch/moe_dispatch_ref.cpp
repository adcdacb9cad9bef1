#include <algorithm>
#include <cstring>

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#endif

#include "layers/common/op_common.h"
#include "layers/moe_dispatch/moe_dispatch.h"
#include "runtime/parallel_for.h"

namespace braid {
namespace {

void check_routes(const Tensor& expert, const Tensor& slot) {
  BRAID_CHECK(expert.ndim == 2 && expert.dtype == DType::i32 && slot.dtype == DType::i32,
              "moe_dispatch: expert and slot must be [M,K] i32; got ", expert.describe(), ", ",
              slot.describe());
  check_shape(slot, {expert.size(0), expert.size(1)});
  if (expert.device == Device::cuda)
    require_gpu("moe_dispatch", {&expert, &slot});
  else
    require_host("moe_dispatch", {&expert, &slot});
}

// GPU rows (x, xe, oe, y, dy, doe, dx): bf16 or f32, one dtype; weights f32.
bool gpu_rows(const char* op, std::initializer_list<const Tensor*> rows,
              std::initializer_list<const Tensor*> weights) {
  require_gpu(op, rows);
  require_gpu(op, weights);
  const DType t = (*rows.begin())->dtype;
  BRAID_CHECK(t == DType::bf16 || t == DType::f32, op,
              ": rows must be bf16 or f32 on the GPU, got ", (*rows.begin())->describe());
  require_dtype(op, t, rows);
  require_dtype(op, DType::f32, weights);
#if !defined(BRAID_WITH_CUDA)
  BRAID_FAIL(op, ": GPU tensors, but this build has no CUDA");
#endif
  return t == DType::bf16;
}

int64_t row_of(const int32_t* ex, const int32_t* sl, const int32_t* off, int64_t i) {
  return sl[i] < 0 ? -1 : off[ex[i]] + sl[i];
}

}  // namespace

int64_t moe_dispatch_plan(const Tensor& expert, const Tensor& slot, const Tensor& counts,
                          int64_t capacity, const Tensor& offsets, const Tensor& row_token,
                          std::vector<int32_t>* host_offsets) {
  check_routes(expert, slot);
  const int64_t m = expert.size(0), k = expert.size(1), e = counts.numel();
  check_shape(offsets, {e + 1});
  check_shape(row_token, {m * k});
  if (expert.device == Device::cuda) {
    require_gpu("moe_dispatch", {&counts, &offsets, &row_token});
    std::vector<int32_t> off(size_t(e + 1), 0);
#if defined(BRAID_WITH_CUDA)
    moe_dispatch_plan_cuda(expert.ptr<int32_t>(), slot.ptr<int32_t>(), counts.ptr<int32_t>(), m,
                           int(k), int(e), capacity, offsets.ptr<int32_t>(),
                           row_token.ptr<int32_t>(), nullptr);
    CUDA_CHECK(
        cudaMemcpy(off.data(), offsets.data, off.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
#endif
    if (host_offsets) *host_offsets = off;
    return off[e];
  }
  require_host("moe_dispatch", {&counts, &offsets, &row_token});
  const int32_t *ex = expert.ptr<int32_t>(), *sl = slot.ptr<int32_t>(),
                *cnt = counts.ptr<int32_t>();
  int32_t *off = offsets.ptr<int32_t>(), *tok = row_token.ptr<int32_t>();
  off[0] = 0;
  for (int64_t j = 0; j < e; ++j)
    off[j + 1] = off[j] + std::min<int32_t>(cnt[j], int32_t(capacity));
  for (int64_t i = 0; i < m * k; ++i) tok[i] = -1;
  for (int64_t i = 0; i < m * k; ++i) {
    BRAID_CHECK(ex[i] >= 0 && ex[i] < e, "moe_dispatch: expert id ", ex[i], " outside [0, ", e,
                ")");
    BRAID_CHECK(sl[i] < capacity, "moe_dispatch: slot ", sl[i], " beyond capacity ", capacity);
    const int64_t r = row_of(ex, sl, off, i);
    if (r >= 0) tok[r] = int32_t(i / k);
  }
  if (host_offsets) host_offsets->assign(off, off + e + 1);
  return off[e];
}

void moe_counts_store(const std::vector<int64_t>& host, const Tensor& t) {
  BRAID_CHECK(t.dtype == DType::i64 && t.is_contiguous() && t.numel() == int64_t(host.size()),
              "moe_counts_store: ", t.describe(), " must be a contiguous i64 tensor of ",
              host.size(), " elements");
  const size_t bytes = host.size() * sizeof(int64_t);
  if (t.device == Device::cuda) {
#if defined(BRAID_WITH_CUDA)
    CUDA_CHECK(cudaMemcpy(t.data, host.data(), bytes, cudaMemcpyHostToDevice));
#endif
    return;
  }
  std::memcpy(t.data, host.data(), bytes);
}

std::vector<int64_t> moe_counts_load(const Tensor& t) {
  BRAID_CHECK(t.dtype == DType::i64 && t.is_contiguous(), "moe_counts_load: ", t.describe(),
              " must be a contiguous i64 tensor");
  std::vector<int64_t> host(size_t(t.numel()));
  const size_t bytes = host.size() * sizeof(int64_t);
  if (t.device == Device::cuda) {
#if defined(BRAID_WITH_CUDA)
    CUDA_CHECK(cudaMemcpy(host.data(), t.data, bytes, cudaMemcpyDeviceToHost));
#endif
    return host;
  }
  std::memcpy(host.data(), t.data, bytes);
  return host;
}

void moe_gather(const Tensor& x, const Tensor& row_token, int64_t rows, const Tensor& xe) {
  BRAID_CHECK(x.ndim == 2 && xe.ndim == 2 && xe.size(1) == x.size(1) && rows <= xe.size(0),
              "moe_gather: x [M,D], xe [R,D] with rows <= R; got ", x.describe(), ", ",
              xe.describe());
  check_same_dtype(x, xe);
  const int64_t d = x.size(1);
  if (x.device == Device::cuda) {
    const bool bf16 = gpu_rows("moe_gather", {&x, &xe}, {});
    require_gpu("moe_gather", {&row_token});
#if defined(BRAID_WITH_CUDA)
    moe_gather_cuda(x.data, row_token.ptr<int32_t>(), rows, d, bf16, xe.data, nullptr);
#endif
    (void)bf16;
    return;
  }
  require_host("moe_gather", {&x, &row_token, &xe});
  const size_t es = dtype_size(x.dtype);
  const int32_t* tok = row_token.ptr<int32_t>();
  parallel_for(rows, [&](int64_t r) {
    std::memcpy(static_cast<char*>(xe.data) + r * d * es,
                static_cast<const char*>(x.data) + tok[r] * d * es, d * es);
  });
}

void moe_gather_backward(const Tensor& dxe, const Tensor& expert, const Tensor& slot,
                         const Tensor& offsets, const Tensor& dx) {
  check_routes(expert, slot);
  const int64_t m = expert.size(0), k = expert.size(1);
  BRAID_CHECK(dx.ndim == 2 && dxe.ndim == 2 && dxe.size(1) == dx.size(1) && dx.size(0) == m,
              "moe_gather_backward: shapes ", dxe.describe(), ", ", dx.describe());
  check_same_dtype(dx, dxe);
  const int64_t d = dx.size(1);
  if (dx.device == Device::cuda) {
    const bool bf16 = gpu_rows("moe_gather_backward", {&dxe, &dx}, {});
    require_gpu("moe_gather_backward", {&offsets});
#if defined(BRAID_WITH_CUDA)
    moe_token_sum_cuda(dxe.data, expert.ptr<int32_t>(), slot.ptr<int32_t>(), offsets.ptr<int32_t>(),
                       nullptr, m, int(k), d, true, bf16, dx.data, nullptr);
#endif
    (void)bf16;
    return;
  }
  require_host("moe_gather_backward", {&dxe, &offsets, &dx});
  const int32_t *ex = expert.ptr<int32_t>(), *sl = slot.ptr<int32_t>(),
                *off = offsets.ptr<int32_t>();
  dispatch_float(dx.dtype, "moe_gather_backward", [&]<typename T>() {
    const T* g = dxe.ptr<T>();
    T* out = dx.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t r = row_of(ex, sl, off, i * k + kk);
        if (r < 0) continue;
        for (int64_t c = 0; c < d; ++c) out[i * d + c] += g[r * d + c];
      }
    });
  });
}

void moe_combine(const Tensor& oe, const Tensor& expert, const Tensor& slot, const Tensor& offsets,
                 const Tensor& weight, const Tensor& y) {
  check_routes(expert, slot);
  const int64_t m = expert.size(0), k = expert.size(1), d = y.size(1);
  check_shape(weight, {m, k});
  check_shape(y, {m, d});
  check_same_dtype(oe, y);
  if (y.device == Device::cuda) {
    const bool bf16 = gpu_rows("moe_combine", {&oe, &y}, {&weight});
    require_gpu("moe_combine", {&offsets});
#if defined(BRAID_WITH_CUDA)
    moe_token_sum_cuda(oe.data, expert.ptr<int32_t>(), slot.ptr<int32_t>(), offsets.ptr<int32_t>(),
                       weight.ptr<float>(), m, int(k), d, false, bf16, y.data, nullptr);
#endif
    (void)bf16;
    return;
  }
  check_same_dtype(weight, y);
  require_host("moe_combine", {&oe, &offsets, &weight, &y});
  const int32_t *ex = expert.ptr<int32_t>(), *sl = slot.ptr<int32_t>(),
                *off = offsets.ptr<int32_t>();
  dispatch_float(y.dtype, "moe_combine", [&]<typename T>() {
    const T *o = oe.ptr<T>(), *w = weight.ptr<T>();
    T* out = y.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      T* yr = out + i * d;
      for (int64_t c = 0; c < d; ++c) yr[c] = T(0);
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t r = row_of(ex, sl, off, i * k + kk);
        if (r < 0) continue;
        for (int64_t c = 0; c < d; ++c) yr[c] += w[i * k + kk] * o[r * d + c];
      }
    });
  });
}

void moe_combine_backward(const Tensor& dy, const Tensor& oe, const Tensor& expert,
                          const Tensor& slot, const Tensor& offsets, const Tensor& weight,
                          const Tensor& doe, const Tensor& dweight) {
  check_routes(expert, slot);
  const int64_t m = expert.size(0), k = expert.size(1), d = dy.size(1);
  check_shape(dweight, {m, k});
  check_same_dtype(dy, doe);
  if (dy.device == Device::cuda) {
    const bool bf16 = gpu_rows("moe_combine_backward", {&dy, &oe, &doe}, {&weight, &dweight});
    require_gpu("moe_combine_backward", {&offsets});
#if defined(BRAID_WITH_CUDA)
    moe_combine_backward_cuda(dy.data, oe.data, expert.ptr<int32_t>(), slot.ptr<int32_t>(),
                              offsets.ptr<int32_t>(), weight.ptr<float>(), m, int(k), d, bf16,
                              doe.data, dweight.ptr<float>(), nullptr);
#endif
    (void)bf16;
    return;
  }
  require_host("moe_combine_backward", {&dy, &oe, &offsets, &weight, &doe, &dweight});
  const int32_t *ex = expert.ptr<int32_t>(), *sl = slot.ptr<int32_t>(),
                *off = offsets.ptr<int32_t>();
  dispatch_float(dy.dtype, "moe_combine_backward", [&]<typename T>() {
    const T *g = dy.ptr<T>(), *o = oe.ptr<T>(), *w = weight.ptr<T>();
    T *go = doe.ptr<T>(), *gw = dweight.ptr<T>();
    parallel_for(m, [&](int64_t i) {
      for (int64_t kk = 0; kk < k; ++kk) {
        const int64_t r = row_of(ex, sl, off, i * k + kk);
        T acc = T(0);
        if (r >= 0) {
          for (int64_t c = 0; c < d; ++c) {
            go[r * d + c] = w[i * k + kk] * g[i * d + c];
            acc += g[i * d + c] * o[r * d + c];
          }
        }
        gw[i * k + kk] = acc;
      }
    });
  });
}

}  // namespace braid
