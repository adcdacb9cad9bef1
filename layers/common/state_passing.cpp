#include "layers/common/state_passing.h"

#include "runtime/check.h"

namespace braid {

StatePassing::StatePassing(const ShardMap& mine, int64_t per_row, Communicator& cp)
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
  cp.all_gather(Tensor::contiguous_view(packed.data(), DType::f64, Device::cpu,
                                        {int64_t(packed.size())}, "shard_map"),
                Tensor::contiguous_view(all_.data(), DType::f64, Device::cpu,
                                        {int64_t(all_.size())}, "shard_maps"));
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

double host_value(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
}

void set_host_value(const Tensor& t, int64_t i, double v) {
  if (t.dtype == DType::f64)
    t.ptr<double>()[i] = v;
  else
    t.ptr<float>()[i] = float(v);
}

std::vector<double> host_values(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = host_value(t, i);
  return v;
}

HostBuffer::HostBuffer(DType dtype, std::vector<int64_t> shape, const std::vector<double>& values) {
  BRAID_CHECK(dtype == DType::f32 || dtype == DType::f64, "HostBuffer: f32 or f64, got ",
              dtype_name(dtype));
  int64_t n = 1;
  for (int64_t x : shape) n *= x;
  storage.assign(n, 0.0);
  t = Tensor::contiguous_view(storage.data(), dtype, Device::cpu, shape, "state");
  for (int64_t i = 0; i < int64_t(values.size()); ++i) set_host_value(t, i, values[i]);
}

const Tensor* scratch_like(std::deque<HostBuffer>& keep, const Tensor* t) {
  if (!t) return nullptr;
  keep.emplace_back(t->dtype, std::vector<int64_t>(t->shape.begin(), t->shape.begin() + t->ndim));
  return &keep.back().t;
}

}  // namespace braid
