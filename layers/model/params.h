// Parameters: every trainable (or persistent) tensor of the model, registered under its HF-style
// name with its shape, initialisation and weight-decay flag. Values and gradients live in two
// arenas allocated once. Initial values depend only on (seed, name, element index in the logical
// tensor): the tensor id is a hash of the name, so any parallel layout initialises the same
// logical tensor identically. A tensor-parallel rank holds a shard: one of `parts` equal slices
// of the logical tensor along one dimension (a box of it, in checkpoint terms).
// Parameters live in one of two regions of the arenas: region 0 holds what every data-parallel
// rank replicates; region 1 the expert weights under expert parallelism, replicated only over the
// expert-data-parallel ranks (so ZeRO-1 shards each region over its own group). Each region is
// padded to its own multiple of elements.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "runtime/arena.h"

namespace braid {

struct ParamInit {
  enum class Kind : uint8_t {
    normal,       // N(0, a^2)
    uniform,      // U(a, b)
    constant,     // a
    log_arange,   // log(1 + (i mod last dim)): Mamba-1 A_log (S4D-real)
    log_uniform,  // log(U(a, b)): Mamba-2 A_log
    dt_bias,      // softplus^-1(exp(U(log a, log b)) floored at 1e-4): Mamba dt bias
  } kind = Kind::normal;
  double a = 0.02, b = 0.0;
};

// Which slice of the logical tensor a parameter holds: part `index` of `parts` equal slices along
// dimension `dim` (dim -1: the whole tensor). A fused weight packs segments along dimension 0
// (Mamba's in_proj rows [z | x | B | C | dt]): `segments` lists their sizes, each is split in
// `parts`, and the rank holds its part of every segment, in order (empty: one segment).
struct ParamShard {
  int dim = -1;
  int64_t parts = 1, index = 0;
  std::vector<int64_t> segments = {};
};

// A box of the logical tensor that a rank holds: its offset and shape per dimension, and where
// its row-major elements start in the rank's tensor (they are consecutive there).
struct ParamBox {
  std::vector<int64_t> offset, shape;
  int64_t local_start = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    return n;
  }
};

struct Param {
  std::string name;
  std::vector<int64_t> shape;         // of what this rank holds
  std::vector<int64_t> global_shape;  // of the logical tensor (== shape unless sharded)
  std::vector<ParamBox> boxes;        // the boxes of it held (empty: the whole tensor)
  ParamInit init;
  bool weight_decay = true;
  bool trainable = true;  // false: persistent state updated by a rule (MoE balancing bias)
  int region = 0;         // 0: replicated over data parallelism; 1: expert-parallel weights
  // A copy of a tensor another pipeline stage owns (tied embeddings on the last stage): updated
  // like the original (their gradients are summed), left out of checkpoints and of the norm.
  bool mirror = false;
  // Read by kernels in the compute dtype (matrices by default; blocks mark others, such as conv
  // biases): under mixed precision such a parameter has a low-precision copy in `compute`.
  bool cast = false;
  Tensor value;
  Tensor grad;     // undefined when not trainable; value's dtype
  Tensor compute;  // what ops read: value itself, or its copy in the compute dtype (cast)
};

// A parameter that other ranks hold (the experts of other expert-parallel ranks): its name and
// logical shape, so that a checkpoint loader can name every tensor of the model.
struct RemoteParam {
  std::string name;
  std::vector<int64_t> shape;
  bool trainable = true;  // false: no optimizer state in checkpoints
};

class ParamSet {
 public:
  // Registers a parameter of logical shape `shape` (of which this rank holds `shard`); the
  // returned pointer stays valid for the ParamSet's life.
  Param* add(std::string name, std::vector<int64_t> shape, ParamInit init, bool weight_decay,
             bool trainable = true, ParamShard shard = {}, int region = 0);
  // Allocates value and gradient arenas (dtype for both, one layout) and binds every Param's
  // tensors, region 0 first; region 0 holds a multiple of pad_elems elements (the data-parallel
  // size, so its flat vector splits into equal shards), region 1 of expert_pad_elems. Mixed
  // precision (compute_dtype other than dtype, e.g. f32 values and gradients with bf16 compute):
  // a third arena holds the compute copies of the parameters marked `cast`.
  void allocate(Backend& backend, DType dtype, int64_t pad_elems = 1, int64_t expert_pad_elems = 1,
                DType compute_dtype = DType::u8);
  void initialize(uint64_t seed);
  void zero_grads();
  // compute <- value (rounded) for every parameter with a copy: after initialisation, an
  // optimizer step or a load. Nothing to do without mixed precision.
  void refresh_compute(void* stream = nullptr);
  DType compute_dtype() const { return compute_dtype_; }

  std::deque<Param>& all() { return params_; }
  const std::deque<Param>& all() const { return params_; }
  const Param* find(const std::string& name) const;
  int64_t numel(bool trainable_only = false) const;
  // The whole value / gradient arena as one flat vector (gaps and padding are zeros), and where a
  // parameter starts in it.
  Tensor flat_values() const;
  Tensor flat_grads() const;
  int64_t flat_offset(const Param& p) const;
  // The same per region: its values and gradients as flat vectors, and where a parameter of the
  // region starts in them (empty vectors for a region without parameters).
  Tensor region_values(int region) const;
  Tensor region_grads(int region) const;
  int64_t region_offset(const Param& p) const { return flat_offset(p) - region_begin_[p.region]; }
  size_t value_bytes() const { return values_.capacity(); }
  size_t grad_bytes() const { return grads_.capacity(); }
  size_t compute_bytes() const { return compute_.capacity(); }

 private:
  std::deque<Param> params_;
  Arena values_, grads_, compute_;
  int64_t region_begin_[3] = {0, 0, 0};  // element offsets: region 0, region 1, end
  DType dtype_ = DType::f32, compute_dtype_ = DType::f32;
  Backend* backend_ = nullptr;
};

uint32_t tensor_id_of(const std::string& name);  // FNV-1a of the name

}  // namespace braid
