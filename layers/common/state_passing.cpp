#include "layers/common/state_passing.h"

#include <cstring>

#include "runtime/check.h"
#include "runtime/dtype.h"

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#endif

namespace braid {

StatePassing::StatePassing(const ShardMap& mine, int64_t per_row, Communicator& cp, Device via,
                           void* stream)
    : rank_(cp.rank()),
      ranks_(cp.size()),
      rows_(int64_t(mine.first_doc.size())),
      per_row_(per_row),
      size_(rows_ * per_row) {
  BRAID_CHECK(int64_t(mine.last_doc.size()) == rows_ && int64_t(mine.decay.size()) == size_ &&
                  int64_t(mine.state.size()) == size_ &&
                  (mine.extra.empty() || int64_t(mine.extra.size()) == size_),
              "state passing: inconsistent shard map sizes");
  std::vector<double> packed;
  packed.reserve(2 * rows_ + 3 * size_);
  packed.insert(packed.end(), mine.first_doc.begin(), mine.first_doc.end());
  packed.insert(packed.end(), mine.last_doc.begin(), mine.last_doc.end());
  packed.insert(packed.end(), mine.decay.begin(), mine.decay.end());
  packed.insert(packed.end(), mine.state.begin(), mine.state.end());
  if (mine.extra.empty())
    packed.resize(packed.size() + size_, 0.0);
  else
    packed.insert(packed.end(), mine.extra.begin(), mine.extra.end());
  all_.resize(packed.size() * ranks_);
  if (via == Device::cpu) {
    cp.all_gather(Tensor::contiguous_view(packed.data(), DType::f64, Device::cpu,
                                          {int64_t(packed.size())}, "shard_map"),
                  Tensor::contiguous_view(all_.data(), DType::f64, Device::cpu,
                                          {int64_t(all_.size())}, "shard_maps"));
    return;
  }
  const ScratchTensor one(DType::f64, {int64_t(packed.size())}, via, stream),
      every(DType::f64, {int64_t(all_.size())}, via, stream);
  set_tensor_values(one.t, packed, stream);
  cp.all_gather(one.t, every.t);
  all_ = tensor_values(every.t, stream);
}

const double* StatePassing::part(int r, int k) const {
  return all_.data() + size_t(r) * (2 * rows_ + 3 * size_) + 2 * rows_ + k * size_;
}

bool StatePassing::flows(int r, int64_t row) const {
  const double* base = all_.data() + size_t(r) * (2 * rows_ + 3 * size_);
  const double* next = all_.data() + size_t(r + 1) * (2 * rows_ + 3 * size_);
  return base[rows_ + row] == next[row];  // last token of shard r, first of shard r + 1
}

std::vector<double> StatePassing::entering_state(const std::vector<double>& initial) const {
  std::vector<double> h(size_, 0.0);
  if (!initial.empty()) h = initial;
  for (int q = 0; q < rank_; ++q) {
    const double *p = part(q, 0), *s = part(q, 1);
    for (int64_t i = 0; i < size_; ++i) h[i] = flows(q, i / per_row_) ? p[i] * h[i] + s[i] : 0.0;
  }
  return h;
}

std::vector<double> StatePassing::arriving_grad() const {
  const double* end = part(ranks_ - 1, 2);
  std::vector<double> g(end, end + size_);
  for (int q = ranks_ - 2; q >= rank_; --q) {
    const double *p = part(q + 1, 0), *s = part(q + 1, 1);
    for (int64_t i = 0; i < size_; ++i) g[i] = flows(q, i / per_row_) ? s[i] + p[i] * g[i] : 0.0;
  }
  return g;
}

void shard_documents(const void* seq_idx, int64_t rows, int64_t t, ShardMap& map,
                     std::vector<bool>& starts_inside) {
  map.first_doc.assign(rows, 0.0), map.last_doc.assign(rows, 0.0);
  starts_inside.assign(rows, false);
  if (!seq_idx) return;
  for (int64_t b = 0; b < rows; ++b) {
    const int32_t* seq = static_cast<const int32_t*>(seq_idx) + b * t;
    map.first_doc[b] = seq[0], map.last_doc[b] = seq[t - 1];
    for (int64_t i = 1; i < t; ++i) starts_inside[b] = starts_inside[b] || seq[i] != seq[i - 1];
  }
}

ScratchTensor::ScratchTensor(DType dtype, std::vector<int64_t> shape, Device device, void* stream)
    : stream_(stream) {
  int64_t n = 1;
  for (int64_t x : shape) n *= x;
  void* p = nullptr;
  if (device == Device::cpu) {
    host_.assign(size_t(n) + 2, 0.0);
    p = host_.data();
  } else {
#if defined(BRAID_WITH_CUDA)
    const size_t bytes = size_t(n) * dtype_size(dtype) + 16;  // + 16: never empty
    const auto s = static_cast<cudaStream_t>(stream);
    CUDA_CHECK(cudaMallocAsync(&p, bytes, s));
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, s));
    dev_ = p;
#else
    BRAID_FAIL("context parallelism: GPU tensors but this build has no CUDA");
#endif
  }
  t = Tensor::contiguous_view(p, dtype, device, shape, "cp_scratch");
}

ScratchTensor::ScratchTensor(ScratchTensor&& o) noexcept
    : t(o.t), host_(std::move(o.host_)), dev_(o.dev_), stream_(o.stream_) {
  o.dev_ = nullptr;
}

ScratchTensor::~ScratchTensor() {
#if defined(BRAID_WITH_CUDA)
  if (dev_) cudaFreeAsync(dev_, static_cast<cudaStream_t>(stream_));
#endif
}

std::vector<int32_t> host_documents(const Tensor* seq_idx, void* stream) {
  if (!seq_idx) return {};
  const std::vector<double> v = tensor_values(*seq_idx, stream);
  return std::vector<int32_t>(v.begin(), v.end());
}

namespace {

// This rank's maps with `local` as their state, passed among the ranks.
StatePassing pass_maps(ShardMap& map, const Tensor& local, Communicator& cp, void* stream) {
  map.state = tensor_values(local, stream);
  return StatePassing(map, local.numel() / local.size(0), cp, local.device, stream);
}
// A ScratchTensor like `local` holding `values`.
ScratchTensor holding(const Tensor& local, const std::vector<double>& values, void* stream) {
  ScratchTensor out(local.dtype,
                    std::vector<int64_t>(local.shape.begin(), local.shape.begin() + local.ndim),
                    local.device, stream);
  set_tensor_values(out.t, values, stream);
  return out;
}

}  // namespace

ScratchTensor shard_entering_state(ShardMap map, const Tensor& local, const Tensor* initial,
                                   Communicator& cp, void* stream) {
  const StatePassing sp = pass_maps(map, local, cp, stream);
  return holding(
      local, sp.entering_state(initial ? tensor_values(*initial, stream) : std::vector<double>{}),
      stream);
}

ScratchTensor shard_arriving_grad(ShardMap map, const Tensor& local, const Tensor* dfinal,
                                  Communicator& cp, void* stream) {
  if (dfinal && cp.rank() == cp.size() - 1) map.extra = tensor_values(*dfinal, stream);
  return holding(local, pass_maps(map, local, cp, stream).arriving_grad(), stream);
}

const Tensor* scratch_like(std::deque<ScratchTensor>& keep, const Tensor* t, void* stream) {
  if (!t) return nullptr;
  keep.emplace_back(t->dtype, std::vector<int64_t>(t->shape.begin(), t->shape.begin() + t->ndim),
                    t->device, stream);
  return &keep.back().t;
}

std::vector<double> tensor_values(const Tensor& t, void* stream) {
  BRAID_CHECK(t.is_contiguous(), "context parallelism: ", t.describe(), " must be contiguous");
  const int64_t n = t.numel();
  std::vector<char> raw(size_t(n) * dtype_size(t.dtype));
  if (t.device == Device::cpu) {
    std::memcpy(raw.data(), t.data, raw.size());
  } else {
#if defined(BRAID_WITH_CUDA)
    const auto s = static_cast<cudaStream_t>(stream);
    CUDA_CHECK(cudaMemcpyAsync(raw.data(), t.data, raw.size(), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
#else
    (void)stream;
#endif
  }
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) {
    const char* e = raw.data() + size_t(i) * dtype_size(t.dtype);
    switch (t.dtype) {
      case DType::f64: {
        double x;
        std::memcpy(&x, e, 8);
        v[i] = x;
        break;
      }
      case DType::f32: {
        float x;
        std::memcpy(&x, e, 4);
        v[i] = x;
        break;
      }
      case DType::bf16: {
        bf16 x;
        std::memcpy(&x, e, 2);
        v[i] = from_bf16(x);
        break;
      }
      case DType::i32: {
        int32_t x;
        std::memcpy(&x, e, 4);
        v[i] = x;
        break;
      }
      default:
        BRAID_FAIL("context parallelism: no values of a ", dtype_name(t.dtype), " tensor");
    }
  }
  return v;
}

void set_tensor_values(const Tensor& t, const std::vector<double>& v, void* stream) {
  BRAID_CHECK(t.is_contiguous() && int64_t(v.size()) == t.numel(),
              "context parallelism: ", v.size(), " values for ", t.describe());
  std::vector<char> raw(v.size() * dtype_size(t.dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    char* e = raw.data() + i * dtype_size(t.dtype);
    switch (t.dtype) {
      case DType::f64:
        std::memcpy(e, &v[i], 8);
        break;
      case DType::f32: {
        const float x = float(v[i]);
        std::memcpy(e, &x, 4);
        break;
      }
      case DType::bf16: {
        const bf16 x = to_bf16(float(v[i]));
        std::memcpy(e, &x, 2);
        break;
      }
      default:
        BRAID_FAIL("context parallelism: no values into a ", dtype_name(t.dtype), " tensor");
    }
  }
  if (t.device == Device::cpu) {
    std::memcpy(t.data, raw.data(), raw.size());
    return;
  }
#if defined(BRAID_WITH_CUDA)
  const auto s = static_cast<cudaStream_t>(stream);
  CUDA_CHECK(cudaMemcpyAsync(t.data, raw.data(), raw.size(), cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaStreamSynchronize(s));  // raw is freed on return
#else
  (void)stream;
#endif
}

}  // namespace braid
