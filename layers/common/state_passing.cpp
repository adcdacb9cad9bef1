#include "layers/common/state_passing.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "layers/common/scratch_tensor.h"
#include "runtime/check.h"
#include "runtime/dtype.h"

#if defined(BRAID_WITH_CUDA)
#include <cuda_runtime.h>

#include "layers/common/state_passing_cuda.h"
#include "runtime/cuda_check.h"
#endif

namespace braid {
namespace {

// The values of a contiguous host tensor (f64, f32 or i32) as f64, and such a tensor (f64, f32)
// set from values: the CPU path's dtype-independent access.
std::vector<double> tensor_values(const Tensor& t) {
  BRAID_CHECK(t.is_contiguous() && t.device == Device::cpu, "context parallelism: ", t.describe(),
              " must be a contiguous host tensor");
  const int64_t n = t.numel();
  std::vector<double> v(n);
  switch (t.dtype) {
    case DType::f64:
      std::copy_n(t.ptr<double>(), n, v.begin());
      break;
    case DType::f32:
      std::copy_n(t.ptr<float>(), n, v.begin());
      break;
    case DType::i32:
      std::copy_n(t.ptr<int32_t>(), n, v.begin());
      break;
    default:
      BRAID_FAIL("context parallelism: no values of a ", dtype_name(t.dtype), " tensor");
  }
  return v;
}

void set_tensor_values(const Tensor& t, const std::vector<double>& v) {
  BRAID_CHECK(t.is_contiguous() && t.device == Device::cpu && int64_t(v.size()) == t.numel(),
              "context parallelism: ", v.size(), " values for ", t.describe());
  if (t.dtype == DType::f64)
    std::copy(v.begin(), v.end(), t.ptr<double>());
  else if (t.dtype == DType::f32)
    std::transform(v.begin(), v.end(), t.ptr<float>(), [](double x) { return float(x); });
  else
    BRAID_FAIL("context parallelism: no values into a ", dtype_name(t.dtype), " tensor");
}

// The sizes of a state map: `local` is [rows, ...].
struct MapDims {
  int64_t rows, per_row, decays;  // decays per row: 0 (none), else C * J of the ShardDecay
};
MapDims map_dims(const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                 const Tensor& out) {
  BRAID_CHECK(local.ndim >= 1 && local.is_contiguous() && out.is_contiguous() &&
                  out.numel() == local.numel() && out.device == local.device,
              "state passing: ", local.describe(), " and ", out.describe(),
              " must be contiguous, on one device and of one size");
  MapDims m{local.size(0), local.numel() / std::max<int64_t>(local.size(0), 1), 0};
  if (seq_idx)
    BRAID_CHECK(seq_idx->ndim == 2 && seq_idx->size(0) == m.rows && seq_idx->dtype == DType::i32,
                "state passing: seq_idx ", seq_idx->describe(), " must be i32 [", m.rows, ",T]");
  if (decay) {
    const Tensor &dt = *decay->dt, &a = *decay->A;
    BRAID_CHECK(dt.ndim == 3 && dt.size(0) == m.rows && a.size(0) == dt.size(2),
                "state passing: dt ", dt.describe(), " and A ", a.describe(),
                " must be [B,T,C] and [C] or [C,J]");
    m.decays = a.numel();
    BRAID_CHECK(m.per_row % m.decays == 0, "state passing: ", m.decays,
                " decays a row do not divide its ", m.per_row, " state elements");
  }
  return m;
}

// ---- CPU: the maps in f64 on the host ----

struct ShardMap {
  std::vector<double> first_doc, last_doc;  // [rows]
  std::vector<double> decay;                // [rows * per_row]: P
  std::vector<double> state;                // [rows * per_row]: H (forward) or G (backward)
  std::vector<double> extra;                // [rows * per_row]: the last rank's end gradient
};

// Every rank's maps (collective over cp), in rank order.
class StatePassing {
 public:
  StatePassing(const ShardMap& mine, int64_t per_row, Communicator& cp)
      : rank_(cp.rank()),
        ranks_(cp.size()),
        rows_(int64_t(mine.first_doc.size())),
        size_(rows_ * per_row),
        per_row_(per_row) {
    std::vector<double> packed;
    packed.reserve(2 * rows_ + 3 * size_);
    for (const std::vector<double>* v : {&mine.first_doc, &mine.last_doc, &mine.decay, &mine.state})
      packed.insert(packed.end(), v->begin(), v->end());
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
  std::vector<double> entering_state(const std::vector<double>& initial) const {
    std::vector<double> h(size_, 0.0);
    if (!initial.empty()) h = initial;
    for (int q = 0; q < rank_; ++q) {
      const double *p = part(q, 0), *s = part(q, 1);
      for (int64_t i = 0; i < size_; ++i) h[i] = flows(q, i / per_row_) ? p[i] * h[i] + s[i] : 0.0;
    }
    return h;
  }
  std::vector<double> arriving_grad() const {
    const double* end = part(ranks_ - 1, 2);
    std::vector<double> g(end, end + size_);
    for (int q = ranks_ - 2; q >= rank_; --q) {
      const double *p = part(q + 1, 0), *s = part(q + 1, 1);
      for (int64_t i = 0; i < size_; ++i) g[i] = flows(q, i / per_row_) ? s[i] + p[i] * g[i] : 0.0;
    }
    return g;
  }

 private:
  const double* part(int r, int k) const {  // k: 0 decay, 1 state, 2 extra
    return all_.data() + size_t(r) * (2 * rows_ + 3 * size_) + 2 * rows_ + k * size_;
  }
  bool flows(int r, int64_t row) const {  // shard r's end state enters shard r + 1
    const double* base = all_.data() + size_t(r) * (2 * rows_ + 3 * size_);
    const double* next = all_.data() + size_t(r + 1) * (2 * rows_ + 3 * size_);
    return base[rows_ + row] == next[row];  // last token of shard r, first of shard r + 1
  }
  int rank_, ranks_;
  int64_t rows_, size_, per_row_;
  std::vector<double> all_;  // [rank][2 rows + 3 size]
};

// The map's documents and decays (its state is set by the caller).
ShardMap host_map(const ShardDecay* decay, const Tensor* seq_idx, const MapDims& m) {
  ShardMap map;
  map.first_doc.assign(m.rows, 0.0), map.last_doc.assign(m.rows, 0.0);
  std::vector<bool> starts(m.rows, false);
  if (seq_idx) {
    const int64_t t = seq_idx->size(1);
    for (int64_t b = 0; b < m.rows; ++b) {
      const int32_t* seq = seq_idx->ptr<int32_t>() + b * t;
      map.first_doc[b] = seq[0], map.last_doc[b] = seq[t - 1];
      for (int64_t i = 1; i < t; ++i) starts[b] = starts[b] || seq[i] != seq[i - 1];
    }
  }
  map.decay.assign(m.rows * m.per_row, 0.0);
  if (!decay) return map;
  const int64_t t = decay->dt->size(1), c = decay->dt->size(2), cols = m.decays / c,
                span = m.per_row / m.decays;
  const std::vector<double> dt = tensor_values(*decay->dt), a = tensor_values(*decay->A),
                            bias = decay->bias ? tensor_values(*decay->bias)
                                               : std::vector<double>(size_t(c), 0.0);
  for (int64_t b = 0; b < m.rows; ++b)
    for (int64_t ch = 0; ch < c && !starts[b]; ++ch) {
      double sum = 0;
      for (int64_t i = 0; i < t; ++i) {
        double x = dt[(b * t + i) * c + ch] + bias[ch];
        if (decay->softplus) x = x > 20 ? x : std::log1p(std::exp(x));
        sum += std::min(std::max(x, decay->lo), decay->hi);
      }
      for (int64_t j = 0; j < cols; ++j)
        std::fill_n(map.decay.begin() + b * m.per_row + (ch * cols + j) * span, span,
                    std::exp(sum * a[ch * cols + j]));
    }
  return map;
}

void host_fold(bool entering, const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
               const Tensor* end, const Tensor& out, Communicator& cp) {
  const MapDims m = map_dims(decay, seq_idx, local, out);
  ShardMap map = host_map(decay, seq_idx, m);
  map.state = tensor_values(local);
  if (!entering && end && cp.rank() == cp.size() - 1) map.extra = tensor_values(*end);
  const StatePassing sp(map, m.per_row, cp);
  set_tensor_values(out, entering
                             ? sp.entering_state(end ? tensor_values(*end) : std::vector<double>{})
                             : sp.arriving_grad());
}

// ---- GPU: the maps in f32 on the device ----

#if defined(BRAID_WITH_CUDA)
bool is_bf16(const Tensor& t, const char* what) {
  BRAID_CHECK(t.dtype == DType::f32 || t.dtype == DType::bf16, "state passing (CUDA): ", what, " ",
              t.describe(), " must be f32 or bf16");
  return t.dtype == DType::bf16;
}

void device_fold(bool entering, const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                 const Tensor* end, const Tensor& out, Communicator& cp, void* stream) {
  const MapDims d = map_dims(decay, seq_idx, local, out);
  const PackedMaps m{d.rows, d.per_row, d.decays};
  const bool bf16 = is_bf16(local, "state");
  BRAID_CHECK(out.dtype == local.dtype &&
                  (!end || (end->dtype == local.dtype && end->numel() == local.numel())),
              "state passing (CUDA): ", out.describe(), " and the end state must be like ",
              local.describe());
  const ScratchTensor mine(DType::f32, {m.size()}, Device::cuda, stream),
      all(DType::f32, {cp.size() * m.size()}, Device::cuda, stream),
      starts(DType::i32, {m.rows}, Device::cuda, stream);
  float* packed = mine.t.ptr<float>();
  if (seq_idx)
    sp_documents_cuda(seq_idx->ptr<int32_t>(), m.rows, seq_idx->size(1), packed,
                      starts.t.ptr<int32_t>(), stream);
  if (decay) {
    const Tensor& dt = *decay->dt;
    BRAID_CHECK(decay->A->dtype == DType::f32 && (!decay->bias || decay->bias->dtype == DType::f32),
                "state passing (CUDA): A and the dt bias must be f32");
    SpDecayArgs a;
    a.dt = dt.data, a.dt_bf16 = is_bf16(dt, "dt");
    a.bias = decay->bias ? decay->bias->ptr<float>() : nullptr, a.A = decay->A->ptr<float>();
    a.starts = seq_idx ? starts.t.ptr<int32_t>() : nullptr;
    a.softplus = decay->softplus, a.lo = float(decay->lo), a.hi = float(decay->hi);
    a.rows = m.rows, a.t = dt.size(1), a.c = dt.size(2), a.a_cols = m.decays / a.c;
    const ScratchTensor partial(DType::f32, {a.rows * sp_dt_parts(a.t) * a.c}, Device::cuda,
                                stream);
    sp_decays_cuda(a, partial.t.ptr<float>(), packed + m.decay_at(), stream);
  }
  sp_pack_cuda(local.data, bf16, local.numel(), packed + m.state_at(), stream);
  if (!entering && end && cp.rank() == cp.size() - 1)
    sp_pack_cuda(end->data, bf16, end->numel(), packed + m.extra_at(), stream);
  cp.all_gather_ordered(mine.t, all.t);
  sp_fold_cuda(all.t.ptr<float>(), m, cp.size(), cp.rank(), entering,
               entering && end ? end->data : nullptr, bf16, out.data, stream);
}
#endif

void fold(bool entering, const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
          const Tensor* end, const Tensor& out, Communicator& cp, void* stream) {
  if (local.device == Device::cpu) return host_fold(entering, decay, seq_idx, local, end, out, cp);
#if defined(BRAID_WITH_CUDA)
  device_fold(entering, decay, seq_idx, local, end, out, cp, stream);
#else
  (void)stream;
  BRAID_FAIL("context parallelism: GPU tensors but this build has no CUDA");
#endif
}

}  // namespace

void shard_entering_state(const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                          const Tensor* initial, const Tensor& out, Communicator& cp,
                          void* stream) {
  fold(true, decay, seq_idx, local, initial, out, cp, stream);
}

void shard_arriving_grad(const ShardDecay* decay, const Tensor* seq_idx, const Tensor& local,
                         const Tensor* dfinal, const Tensor& out, Communicator& cp, void* stream) {
  fold(false, decay, seq_idx, local, dfinal, out, cp, stream);
}

}  // namespace braid
