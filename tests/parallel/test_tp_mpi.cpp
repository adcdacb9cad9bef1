// Tensor-parallel blocks (under mpirun with P ranks, tp = P): a block split over the ranks against
// the same block whole on one rank, on the same inputs and initial weights: the forward output,
// the input gradient, and every parameter gradient (this rank's slice of it).
// Tolerance (DESIGN: at most 2x the error of a naive same-precision implementation, against
// fp64): the whole block runs in f64 (the truth) and in f32 (the naive error); the split block
// (f32) sums P partial products where the whole one sums once, which reorders the rounding but
// does not grow it, so its error against f64 must be at most twice the naive one, plus 1e-6 of
// the scale. Also: the outputs every rank holds (replicated) are bit-identical across ranks.
// Expert parallel (ep = P, each rank with its own tokens): the MoE block with E/P experts per
// rank against the whole block run on the same rank's tokens; an expert's gradient is the sum
// over every rank's tokens routed to it, so it is compared with the whole blocks' gradients
// summed over the ranks (in f64).
// Context parallel (cp = P): the Mamba-1 and Mamba-2 mixers (states and conv halos passed between
// the ranks) and attention (load-balanced all-gather) with each rank holding a shard of every
// sequence, against the whole block over the whole sequence: output and input-gradient shards, and
// every parameter gradient summed over the ranks, with the same tolerance.
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "layers/blocks/attention_block.h"
#include "layers/blocks/mamba1_mixer.h"
#include "layers/blocks/mamba2_mixer.h"
#include "layers/blocks/mlp.h"
#include "layers/blocks/moe.h"
#include "parallel/communicator.h"
#include "runtime/backend.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace braid;

// One block with its parameters and memory.
struct Instance {
  ParamSet params;
  std::unique_ptr<Block> block;
  Arena saved, scratch;
};

using MakeBlock = std::function<std::unique_ptr<Block>(ParamSet&, const TensorParallel&)>;

std::unique_ptr<Instance> build(const MakeBlock& make, const TensorParallel& tp, DType dtype,
                                Backend& backend, int64_t b, int64_t t) {
  auto in = std::make_unique<Instance>();
  in->block = make(in->params, tp);
  in->params.allocate(backend, dtype);
  in->params.initialize(11);
  Arena sv = Arena::measuring("saved", Device::cpu), sc = Arena::measuring("scratch", Device::cpu);
  in->block->plan_state(sv);
  in->block->plan(sv, sc, b, t);
  in->saved = Arena::allocate("saved", backend, sv.high_water());
  in->scratch = Arena::allocate("scratch", backend, sc.high_water());
  in->block->plan_state(in->saved);
  in->block->plan(in->saved, in->scratch, b, t);
  backend.fill(in->saved.bytes(), 0.0, {});  // the state (MoE counts) starts at zero
  return in;
}

// Host storage viewed as a tensor of dtype.
struct Buffer {
  std::vector<double> storage;
  Tensor t;
  Buffer(DType dtype, std::vector<int64_t> shape, const std::vector<double>& values) {
    storage.resize(values.size());
    t = Tensor::contiguous_view(storage.data(), dtype, Device::cpu, shape, "buffer");
    for (size_t i = 0; i < values.size(); ++i)
      if (dtype == DType::f64)
        t.ptr<double>()[i] = values[i];
      else
        t.ptr<float>()[i] = float(values[i]);
  }
};

std::vector<double> values_of(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i)
    v[i] = t.dtype == DType::f64 ? t.ptr<double>()[i] : double(t.ptr<float>()[i]);
  return v;
}

// The elements of a whole tensor (values of its logical shape) that a shard holds, in order.
std::vector<double> slice_of(const std::vector<double>& whole, const Param& shard) {
  if (shard.boxes.empty()) return whole;
  std::vector<double> out(shard.value.numel());
  for (const ParamBox& b : shard.boxes)
    for (int64_t k = 0; k < b.numel(); ++k) {
      int64_t i = 0, inner = b.numel();
      for (size_t d = 0; d < b.shape.size(); ++d) {
        inner /= b.shape[d];
        i = i * shard.global_shape[d] + b.offset[d] + k / inner % b.shape[d];
      }
      out[b.local_start + k] = whole[i];
    }
  return out;
}

// A block built (tensor parallel over tp) for [b, t] tokens and run forward and backward once.
struct Result {
  std::unique_ptr<Instance> inst;
  std::vector<double> y, dx;
};
Result run_block(const MakeBlock& make, const TensorParallel& tp, DType dtype, Backend& backend,
                 int64_t b, int64_t t, int64_t d, const std::vector<double>& x,
                 const std::vector<double>& dy, const BatchMeta& meta) {
  Result r;
  r.inst = build(make, tp, dtype, backend, b, t);
  Buffer xb(dtype, {b, t, d}, x), dyb(dtype, {b, t, d}, dy), yb(dtype, {b, t, d}, x),
      dxb(dtype, {b, t, d}, x);
  r.inst->params.zero_grads();
  r.inst->block->forward(xb.t, yb.t, meta);
  r.inst->block->backward(xb.t, dyb.t, dxb.t, meta);
  r.y = values_of(yb.t), r.dx = values_of(dxb.t);
  return r;
}

// v summed over the ranks (in f64).
std::vector<double> summed(Communicator& world, std::vector<double> v) {
  world.all_reduce(
      Tensor::contiguous_view(v.data(), DType::f64, Device::cpu, {int64_t(v.size())}, "sum"),
      ReduceOp::sum);
  return v;
}

double max_err(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
  return e;
}
double max_abs(const std::vector<double>& a) {
  double e = 0;
  for (double x : a) e = std::max(e, std::fabs(x));
  return e;
}

int failures = 0;
void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& naive, const std::vector<double>& truth, int rank) {
  const double tol = 2 * max_err(naive, truth) + 1e-6 * max_abs(truth);
  const double err = max_err(got, truth);
  if (!(err <= tol)) {
    std::fprintf(stderr, "rank %d: %s: error %.3g > tolerance %.3g (naive error %.3g)\n", rank,
                 what.c_str(), err, tol, max_err(naive, truth));
    ++failures;
  }
}

// Runs block `name` whole (f64, f32) and split over the world; checks as described above.
void check_block(const std::string& name, const MakeBlock& make, int64_t d, Communicator& world,
                 Backend& backend) {
  const int64_t b = 2, t = 5;
  const int rank = world.rank();
  // Two documents in the first row, one in the second.
  std::vector<int32_t> seq = {0, 0, 0, 1, 1, 0, 0, 0, 0, 0}, pos = {0, 1, 2, 0, 1, 0, 1, 2, 3, 4};
  const Tensor seq_t = Tensor::contiguous_view(seq.data(), DType::i32, Device::cpu, {b, t}, "seq"),
               pos_t = Tensor::contiguous_view(pos.data(), DType::i32, Device::cpu, {b, t}, "pos");
  BatchMeta meta;
  meta.seq_idx = &seq_t, meta.positions = &pos_t;
  std::vector<double> x(b * t * d), dy(b * t * d);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::sin(0.37 * double(i) + 0.1);
    dy[i] = std::cos(0.53 * double(i) + 0.2);
  }
  auto run = [&](DType dtype, const TensorParallel& tp) {
    return run_block(make, tp, dtype, backend, b, t, d, x, dy, meta);
  };
  const Result truth = run(DType::f64, {}), naive = run(DType::f32, {}),
               split = run(DType::f32, {&world});
  expect_close(name + " y", split.y, naive.y, truth.y, rank);
  expect_close(name + " dx", split.dx, naive.dx, truth.dx, rank);
  for (const Param& p : split.inst->params.all()) {
    const Param* tw = truth.inst->params.find(p.name);
    const Param* nw = naive.inst->params.find(p.name);
    if (!p.trainable) continue;
    expect_close(name + " grad " + p.name, values_of(p.grad), slice_of(values_of(nw->grad), p),
                 slice_of(values_of(tw->grad), p), rank);
  }
  // Replicated outputs: bit-identical on every rank.
  for (const auto* v : {&split.y, &split.dx}) {
    std::vector<double> all(v->size() * world.size());
    std::vector<double> mine = *v;
    world.all_gather(
        Tensor::contiguous_view(mine.data(), DType::f64, Device::cpu, {int64_t(mine.size())},
                                "mine"),
        Tensor::contiguous_view(all.data(), DType::f64, Device::cpu, {int64_t(all.size())}, "all"));
    for (int q = 1; q < world.size(); ++q)
      for (size_t i = 0; i < v->size(); ++i)
        if (all[q * v->size() + i] != all[i]) {
          std::fprintf(stderr, "rank %d: %s: rank %d's replicated output differs from rank 0's\n",
                       rank, name.c_str(), q);
          ++failures;
          i = v->size();
        }
  }
}

// The MoE block split over the world as experts (ep = P), each rank with its own tokens.
void check_expert_parallel(const MoeConfig& cfg, Communicator& world, Backend& backend) {
  const int64_t b = 2, t = 5, d = cfg.d_model;
  const int rank = world.rank();
  std::vector<double> x(b * t * d), dy(b * t * d);
  for (size_t i = 0; i < x.size(); ++i) {  // different tokens on every rank
    x[i] = std::sin(0.37 * double(i) + 0.1 + rank);
    dy[i] = std::cos(0.53 * double(i) + 0.2 + 2 * rank);
  }
  auto run = [&](DType dtype, Communicator* ep) {
    const MakeBlock make = [&](ParamSet& ps, const TensorParallel& tp) {
      return std::make_unique<MoeBlock>(cfg, ps, "moe", 0.3, 0.2, tp, ep);
    };
    return run_block(make, {}, dtype, backend, b, t, d, x, dy, BatchMeta{});
  };
  const Result truth = run(DType::f64, nullptr), naive = run(DType::f32, nullptr),
               split = run(DType::f32, &world);
  expect_close("moe ep y", split.y, naive.y, truth.y, rank);
  expect_close("moe ep dx", split.dx, naive.dx, truth.dx, rank);
  int experts_here = 0;
  for (const Param& tw : truth.inst->params.all()) {  // collective: same order on every rank
    const Param* sp = split.inst->params.find(tw.name);
    const bool expert = tw.name.find(".experts.") != std::string::npos;
    if (!tw.trainable) continue;
    // An expert's gradient sums every rank's tokens routed to it.
    auto whole = [&](const Result& res) {
      const std::vector<double> g = values_of(res.inst->params.find(tw.name)->grad);
      return expert ? summed(world, g) : g;
    };
    const std::vector<double> tg = whole(truth), ng = whole(naive);
    if (!sp) continue;  // another rank's expert
    experts_here += expert;
    expect_close("moe ep grad " + tw.name, values_of(sp->grad), ng, tg, rank);
  }
  if (experts_here != 3 * int(cfg.experts / world.size())) {
    std::fprintf(stderr, "rank %d: moe ep holds %d expert weights\n", rank, experts_here);
    ++failures;
  }
}

// Rows [t0, t0 + len) of every [B,T,D] sequence.
std::vector<double> rows_of(const std::vector<double>& v, int64_t b, int64_t t, int64_t d,
                            int64_t t0, int64_t len) {
  std::vector<double> out;
  for (int64_t i = 0; i < b; ++i)
    out.insert(out.end(), v.begin() + (i * t + t0) * d, v.begin() + (i * t + t0 + len) * d);
  return out;
}

void check_block_cp(const std::string& name, const MakeBlock& make, int64_t d, Communicator& world,
                    Backend& backend) {
  const int64_t b = 2, tr = 5, t = tr * world.size();
  const int rank = world.rank();
  std::vector<double> x(b * t * d), dy(b * t * d);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::sin(0.37 * double(i) + 0.1);
    dy[i] = std::cos(0.53 * double(i) + 0.2);
  }
  // Row 0: a document starting inside the first shard and one at the second shard's first token.
  std::vector<int32_t> seq(b * t, 0), pos(b * t, 0);
  for (int64_t i = 0; i < t; ++i) seq[i] = (i >= 2 ? 1 : 0) + (i >= tr ? 1 : 0);
  auto run = [&](DType dtype, int64_t len, int64_t t0, Communicator* cp) {
    std::vector<int32_t> s, p;
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = t0; j < t0 + len; ++j)
        s.push_back(seq[i * t + j]), p.push_back(pos[i * t + j]);
    const Tensor st = Tensor::contiguous_view(s.data(), DType::i32, Device::cpu, {b, len}, "seq"),
                 pt = Tensor::contiguous_view(p.data(), DType::i32, Device::cpu, {b, len}, "pos");
    BatchMeta meta;
    meta.seq_idx = &st, meta.positions = &pt, meta.cp = cp;
    return run_block(make, {}, dtype, backend, b, len, d, rows_of(x, b, t, d, t0, len),
                     rows_of(dy, b, t, d, t0, len), meta);
  };
  const Result truth = run(DType::f64, t, 0, nullptr), naive = run(DType::f32, t, 0, nullptr),
               split = run(DType::f32, tr, rank * tr, &world);
  auto mine = [&](const std::vector<double>& v) { return rows_of(v, b, t, d, rank * tr, tr); };
  expect_close(name + " y", split.y, mine(naive.y), mine(truth.y), rank);
  expect_close(name + " dx", split.dx, mine(naive.dx), mine(truth.dx), rank);
  for (const Param& p : split.inst->params.all()) {
    if (!p.trainable) continue;
    expect_close(name + " grad " + p.name, summed(world, values_of(p.grad)),
                 values_of(naive.inst->params.find(p.name)->grad),
                 values_of(truth.inst->params.find(p.name)->grad), rank);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  try {
    auto backend = make_cpu_backend();
    const int64_t d = 12;
    check_block(
        "mlp",
        [&](ParamSet& ps, const TensorParallel& tp) {
          return std::make_unique<MlpBlock>(MlpConfig{d, 24}, ps, "mlp", 0.3, 0.2, tp);
        },
        d, *world, *backend);
    check_block(
        "attention",
        [&](ParamSet& ps, const TensorParallel& tp) {
          return std::make_unique<AttentionBlock>(AttentionConfig{d, 8, 4, 2, true, 10000.0}, ps,
                                                  "attn", 0.3, 0.2, tp);
        },
        d, *world, *backend);
    check_block(
        "mamba2",
        [&](ParamSet& ps, const TensorParallel& tp) {
          Mamba2Config c;
          c.d_model = d, c.heads = 8, c.head_dim = 3, c.groups = 4, c.d_state = 4, c.chunk = 4;
          return std::make_unique<Mamba2Mixer>(c, ps, "m2", 0.3, 0.2, tp);
        },
        d, *world, *backend);
    for (bool jamba : {false, true})
      check_block(
          jamba ? "mamba1 (dt/B/C norms)" : "mamba1",
          [&](ParamSet& ps, const TensorParallel& tp) {
            Mamba1Config c;
            c.d_model = d, c.d_inner = 16, c.d_state = 4, c.dt_rank = 3, c.dt_bc_norm = jamba;
            return std::make_unique<Mamba1Mixer>(c, ps, "m1", 0.3, 0.2, tp);
          },
          d, *world, *backend);
    for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid})
      check_block(
          score == RouterScore::softmax ? "moe (softmax, shared expert)"
                                        : "moe (sigmoid, capacity)",
          [&](ParamSet& ps, const TensorParallel& tp) {
            MoeConfig c;
            c.d_model = d, c.experts = 4, c.top_k = 2, c.ffn = 8, c.score = score;
            c.z_loss_coef = 0.1;
            if (score == RouterScore::softmax)
              c.shared_ffn = 8;
            else
              c.normalize_topk = true, c.capacity_factor = 1.0;
            return std::make_unique<MoeBlock>(c, ps, "moe", 0.3, 0.2, tp);
          },
          d, *world, *backend);
    check_block_cp(
        "mamba2 (context parallel)",
        [&](ParamSet& ps, const TensorParallel& tp) {
          Mamba2Config c;
          c.d_model = d, c.heads = 4, c.head_dim = 3, c.groups = 2, c.d_state = 4, c.chunk = 4;
          return std::make_unique<Mamba2Mixer>(c, ps, "m2", 0.3, 0.2, tp, true);
        },
        d, *world, *backend);
    check_block_cp(
        "attention (context parallel)",
        [&](ParamSet& ps, const TensorParallel& tp) {
          return std::make_unique<AttentionBlock>(AttentionConfig{d, 8, 4, 2, true, 10000.0}, ps,
                                                  "attn", 0.3, 0.2, tp);
        },
        d, *world, *backend);
    check_block_cp(
        "mamba1 (context parallel)",
        [&](ParamSet& ps, const TensorParallel& tp) {
          Mamba1Config c;
          c.d_model = d, c.d_inner = 16, c.d_state = 4, c.dt_rank = 3, c.dt_bc_norm = true;
          return std::make_unique<Mamba1Mixer>(c, ps, "m1", 0.3, 0.2, tp, true);
        },
        d, *world, *backend);
    MoeConfig ep;
    ep.d_model = d, ep.experts = 8, ep.top_k = 2, ep.ffn = 6, ep.z_loss_coef = 0.1;
    check_expert_parallel(ep, *world, *backend);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", world->rank(), e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures, argv[0]);
}
