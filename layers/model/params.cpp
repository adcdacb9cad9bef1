#include "layers/model/params.h"

#include "layers/elementwise/elementwise.h"
#include "runtime/parallel_for.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace braid {

uint32_t tensor_id_of(const std::string& name) {
  uint32_t h = 2166136261u;
  for (unsigned char c : name) h = (h ^ c) * 16777619u;
  return h;
}

Param* ParamSet::add(std::string name, std::vector<int64_t> shape, ParamInit init,
                     bool weight_decay, bool trainable, ParamShard shard, int region) {
  BRAID_CHECK(find(name) == nullptr, "parameter '", name, "' registered twice");
  BRAID_CHECK(region == 0 || region == 1, "parameter '", name, "': region ", region,
              " is not 0 or 1");
  BRAID_CHECK(!backend_, "parameter '", name, "' registered after allocation");
  std::vector<int64_t> local = shape;
  std::vector<ParamBox> boxes;
  if (shard.dim >= 0) {
    std::vector<int64_t> segs = shard.segments;
    if (segs.empty()) segs = {shard.dim < static_cast<int>(shape.size()) ? shape[shard.dim] : 0};
    int64_t total = 0;
    bool ok = shard.dim < static_cast<int>(shape.size()) && shard.parts >= 1 && shard.index >= 0 &&
              shard.index < shard.parts && (segs.size() == 1 || shard.dim == 0);
    for (int64_t g : segs) ok = ok && g % shard.parts == 0, total += g;
    BRAID_CHECK(ok && total == shape[shard.dim], "parameter '", name, "': cannot take part ",
                shard.index, " of ", shard.parts, " of every segment along dimension ", shard.dim,
                " of a ", shape.size(), "-dim tensor");
    local[shard.dim] = shape[shard.dim] / shard.parts;
    int64_t inner = 1;  // elements per index along dim in the local tensor
    for (size_t d = shard.dim + 1; d < shape.size(); ++d) inner *= shape[d];
    int64_t global0 = 0, local0 = 0;
    for (int64_t g : segs) {
      ParamBox b{std::vector<int64_t>(shape.size(), 0), local, local0 * inner};
      b.offset[shard.dim] = global0 + shard.index * (g / shard.parts);
      b.shape[shard.dim] = g / shard.parts;
      boxes.push_back(std::move(b));
      global0 += g, local0 += g / shard.parts;
    }
  }
  const bool matrix = shape.size() >= 2;
  params_.push_back(Param{std::move(name),
                          std::move(local),
                          std::move(shape),
                          std::move(boxes),
                          init,
                          weight_decay,
                          trainable,
                          region,
                          false,
                          matrix,
                          {},
                          {},
                          {}});
  return &params_.back();
}

const Param* ParamSet::find(const std::string& name) const {
  for (const Param& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t ParamSet::numel(bool trainable_only) const {
  int64_t n = 0;
  for (const Param& p : params_) {
    if (trainable_only && !p.trainable) continue;
    int64_t k = 1;
    for (int64_t s : p.shape) k *= s;
    n += k;
  }
  return n;
}

void ParamSet::allocate(Backend& backend, DType dtype, int64_t pad_elems, int64_t expert_pad_elems,
                        DType compute_dtype) {
  BRAID_CHECK(pad_elems >= 1 && expert_pad_elems >= 1, "ParamSet::allocate: padding multiples ",
              pad_elems, ", ", expert_pad_elems, " must be positive");
  const size_t esize = dtype_size(dtype);
  auto round_up = [](size_t x, size_t q) { return (x + q - 1) / q * q; };
  bool experts = false;
  for (const Param& p : params_) experts = experts || p.region == 1;
  // Values and gradients share one layout (a non-trainable parameter's gradient slot is reserved
  // but unused), so the two arenas can be treated as flat vectors element by element. Region 1
  // starts at a byte offset that is a multiple of region 0's padding quantum and of the arena
  // alignment (a filler tensor takes the gap).
  size_t region1 = 0, total = 0;
  auto bind = [&](Arena& a, bool grads) {
    for (int r = 0; r < 2; ++r) {
      if (r == 1) {
        if (!experts) break;
        const size_t start = round_up(a.used(), Arena::kAlign);
        if (a.is_measuring())
          region1 = round_up(a.used(), std::lcm(size_t(pad_elems) * esize, Arena::kAlign));
        a.take("region_padding", DType::u8, {int64_t(region1 - start)});
      }
      for (Param& p : params_) {
        if (p.region != r) continue;
        Tensor t = a.take(p.name + (grads ? ".grad" : ""), dtype, p.shape);
        if (!grads)
          p.value = t;
        else if (p.trainable)
          p.grad = t;
      }
    }
  };
  Arena plan = Arena::measuring("parameters", backend.device());
  bind(plan, false);
  if (experts)
    total = region1 + round_up(plan.high_water() - region1, size_t(expert_pad_elems) * esize);
  else
    total = round_up(plan.high_water(), size_t(pad_elems) * esize);
  values_ = Arena::allocate("parameters", backend, total);
  grads_ = Arena::allocate("gradients", backend, total);
  // Alignment gaps and padding are zero and stay zero (nothing writes them).
  backend.fill(values_.bytes(), 0.0, {});
  backend.fill(grads_.bytes(), 0.0, {});
  bind(values_, false);
  bind(grads_, true);
  compute_dtype_ = compute_dtype == DType::u8 ? dtype : compute_dtype;
  auto bind_copies = [&](Arena& a) {
    for (Param& p : params_)
      p.compute = p.cast && compute_dtype_ != dtype
                      ? a.take(p.name + ".compute", compute_dtype_, p.shape)
                      : p.value;
  };
  Arena copies = Arena::measuring("compute_copies", backend.device());
  bind_copies(copies);
  compute_ = Arena::allocate("compute_copies", backend, copies.high_water());
  bind_copies(compute_);
  region_begin_[0] = 0;
  region_begin_[1] = int64_t((experts ? region1 : total) / esize);
  region_begin_[2] = int64_t(total / esize);
  dtype_ = dtype;
  backend_ = &backend;
}

Tensor ParamSet::flat_values() const {
  return Tensor::contiguous_view(values_.bytes().data, dtype_, values_.device(),
                                 {static_cast<int64_t>(values_.capacity() / dtype_size(dtype_))},
                                 "parameters");
}

Tensor ParamSet::flat_grads() const {
  return Tensor::contiguous_view(grads_.bytes().data, dtype_, grads_.device(),
                                 {static_cast<int64_t>(grads_.capacity() / dtype_size(dtype_))},
                                 "gradients");
}

Tensor ParamSet::region_values(int region) const {
  const int64_t a = region_begin_[region], b = region_begin_[region + 1];
  return Tensor::contiguous_view(static_cast<char*>(values_.bytes().data) + a * dtype_size(dtype_),
                                 dtype_, values_.device(), {b - a}, "parameters");
}

Tensor ParamSet::region_grads(int region) const {
  const int64_t a = region_begin_[region], b = region_begin_[region + 1];
  return Tensor::contiguous_view(static_cast<char*>(grads_.bytes().data) + a * dtype_size(dtype_),
                                 dtype_, grads_.device(), {b - a}, "gradients");
}

int64_t ParamSet::flat_offset(const Param& p) const {
  return (static_cast<const char*>(p.value.data) - static_cast<const char*>(values_.bytes().data)) /
         static_cast<int64_t>(dtype_size(dtype_));
}

void ParamSet::initialize(uint64_t seed) {
  BRAID_CHECK(backend_, "ParamSet::initialize before allocate");
  for (Param& p : params_) {
    const int64_t n = p.value.numel(), last = p.global_shape.empty() ? 1 : p.global_shape.back();
    RandomSpec spec{RandomSpec::Kind::uniform, seed, tensor_id_of(p.name), 0.0f, 1.0f};
    std::vector<double> host(n);  // initial values are computed on the host, then copied
    // The logical index of every element held: box by box (row-major within a box).
    std::vector<int64_t> logical(n);
    if (p.boxes.empty())
      for (int64_t li = 0; li < n; ++li) logical[li] = li;
    for (const ParamBox& b : p.boxes)
      for (int64_t k = 0; k < b.numel(); ++k) {
        int64_t i = 0, inner = b.numel();
        for (size_t d = 0; d < b.shape.size(); ++d) {
          inner /= b.shape[d];
          i = i * p.global_shape[d] + b.offset[d] + k / inner % b.shape[d];
        }
        logical[b.local_start + k] = i;
      }
    constexpr int64_t kBlock = 1 << 16;  // elements per task (each value depends on i only)
    parallel_for((n + kBlock - 1) / kBlock, [&](int64_t blk) {
      for (int64_t li = blk * kBlock; li < std::min(n, (blk + 1) * kBlock); ++li) {
        const int64_t i = logical[li];
        const double u = random_value(spec, static_cast<uint64_t>(i));
        const double a = p.init.a, b = p.init.b;
        switch (p.init.kind) {
          case ParamInit::Kind::normal: {
            const RandomSpec ns{RandomSpec::Kind::normal, seed, spec.tensor_id, 0.0f, float(a)};
            host[li] = random_value(ns, static_cast<uint64_t>(i));
            break;
          }
          case ParamInit::Kind::uniform:
            host[li] = a + (b - a) * u;
            break;
          case ParamInit::Kind::constant:
            host[li] = a;
            break;
          case ParamInit::Kind::log_arange:
            host[li] = std::log(double(1 + i % last));
            break;
          case ParamInit::Kind::log_uniform:
            host[li] = std::log(a + (b - a) * u);
            break;
          case ParamInit::Kind::dt_bias: {
            const double dt =
                std::max(std::exp(std::log(a) + (std::log(b) - std::log(a)) * u), 1e-4);
            host[li] = dt + std::log(-std::expm1(-dt));
            break;
          }
        }
      }
    });
    const Tensor& v = p.value;
    std::vector<char> staged(v.nbytes());
    for (int64_t i = 0; i < n; ++i) {
      switch (v.dtype) {
        case DType::f32:
          reinterpret_cast<float*>(staged.data())[i] = float(host[i]);
          break;
        case DType::f64:
          reinterpret_cast<double*>(staged.data())[i] = host[i];
          break;
        case DType::bf16:
          reinterpret_cast<bf16*>(staged.data())[i] = to_bf16(float(host[i]));
          break;
        default:
          BRAID_FAIL("parameter '", p.name, "' has unsupported dtype ", dtype_name(v.dtype));
      }
    }
    backend_->copy(v.data, v.device, staged.data(), Device::cpu, v.nbytes(), {});
  }
  refresh_compute();
  backend_->synchronize({});
}

void ParamSet::zero_grads() {
  backend_->fill(grads_.bytes(), 0.0, {});  // gaps and padding are zero already
}

void ParamSet::refresh_compute(void* stream) {
  for (Param& p : params_)
    if (p.compute.data != p.value.data) cast_into(p.compute, p.value, stream);
}

}  // namespace braid
