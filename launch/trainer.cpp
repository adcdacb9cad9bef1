#include "launch/trainer.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "checkpoint/async_save.h"
#include "checkpoint/checkpoint.h"
#include "data/dataset.h"
#include "launch/job_control.h"
#include "launch/metrics.h"
#include "launch/run_optimizer.h"
#include "layers/model/model.h"
#include "optim/adamw.h"
#include "optim/zero1_adamw.h"
#include "parallel/grad_buckets.h"
#include "parallel/launch_env.h"
#include "parallel/pipeline_executor.h"
#include "runtime/arena.h"

namespace braid {
namespace {

// The GPU of this rank: its local rank on its node (one rank per GPU), or the only GPU it sees
// (a launcher that gives each rank its own through CUDA_VISIBLE_DEVICES).
int gpu_of_rank(int rank) {
  const int n = cuda_device_count();
  BRAID_REQUIRE(n > 0, "train.device = cuda: no GPU is visible (or Braid was built without CUDA)");
  const LaunchEnv env = read_launch_env();
  if (env.world_size == 1 || n == 1) return 0;
  BRAID_REQUIRE(env.local_rank < n, "train.device = cuda: rank ", rank, " is local rank ",
                env.local_rank, " of its node (", env.source, "), but only ", n,
                " GPUs are visible; run one rank per GPU");
  return env.local_rank;
}

using Clock = std::chrono::steady_clock;

std::string hms(double s) {
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", (long long)(t / 3600),
                (long long)(t / 60 % 60), (long long)(t % 60));
  return buf;
}

std::string mib(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", double(bytes) / (1 << 20));
  return buf;
}

// Host buffers for one microbatch, from an arena sized once.
struct BatchBuffers {
  Arena arena;
  Batch batch;
  BatchBuffers(Backend& be, int64_t b, int64_t t) {
    auto take = [&](Arena& a) {
      return Batch{a.take("tokens", DType::i32, {b, t}), a.take("targets", DType::i32, {b, t}),
                   a.take("seq_idx", DType::i32, {b, t}), a.take("positions", DType::i32, {b, t})};
    };
    Arena plan = Arena::measuring("batch", Device::cpu);
    take(plan);
    arena = Arena::allocate("batch", be, plan.high_water());
    batch = take(arena);
  }
};

// The f-th of a batch's four [B,T] tensors (tokens, targets, seq_idx, positions).
const Tensor& field(const Batch& batch, int f) {
  const Tensor* all[4] = {&batch.tokens, &batch.targets, &batch.seq_idx, &batch.positions};
  return *all[f];
}

// f(), with what to change in the config added to an out-of-memory error.
template <typename F>
auto with_memory_hint(const std::string& hint, F&& f) {
  try {
    return f();
  } catch (const OutOfMemory& e) {
    BRAID_REJECT(e.what(), "; ", hint);
  }
}

std::string ckpt_dir_of(const RunConfig& cfg) {
  return cfg.checkpoint.dir.empty()
             ? (std::filesystem::path(cfg.train.out_dir) / "checkpoints").string()
             : cfg.checkpoint.dir;
}

void fill(const Dataset& data, Sampler& sampler, int64_t first, const Batch& batch) {
  for (int64_t r = 0; r < batch.tokens.size(0); ++r)
    data.fill_row(sampler.sample(first + r), r, batch.tokens, batch.targets, batch.seq_idx,
                  batch.positions);
}

// One pipeline stage's part of a training step: the executor (parallel/pipeline_executor.h) runs
// the schedule's forwards and backwards over the step's microbatches. A chunk before the model's
// last keeps the activations of every microbatch it has run forward and not yet backward, each in
// an activation slot of its model (as many as the schedule holds at once:
// chunk_peak_in_flight), and sends its output after the forward; its backward runs from that
// slot. The last chunk runs its forward with its backward, then computes the loss. Buffers per
// microbatch and chunk, on the model's device in its activation dtype: the input and output
// activations and their gradients ([rows, D] each); and one input for the held-out forward.
class StageRun final : public PipeStage {
 public:
  // chunks: this stage's model chunks (piece c P + stage is chunks[c]).
  StageRun(Backend& backend, std::vector<Model*> chunks, int64_t microbatches, int64_t rows,
           int64_t d)
      : backend_(backend), chunks_(std::move(chunks)) {
    const DType dtype = chunks_.front()->stage_output().dtype;
    const size_t n = 4 * size_t(microbatches) * chunks_.size() + 1;
    arena_ = Arena::allocate("pipeline_stage", backend,
                             n * (size_t(rows * d) * dtype_size(dtype) + Arena::kAlign));
    for (const char* name :
         {"stage_input", "stage_output", "stage_output_grad", "stage_input_grad"})
      for (int64_t i = 0; i < microbatches * int64_t(chunks_.size()); ++i)
        buffers_.push_back(arena_.take(name, dtype, {rows, d}));
    eval_input_ = arena_.take("eval_stage_input", dtype, {rows, d});
    slot_of_.assign(size_t(microbatches) * chunks_.size(), -1);
    for (Model* m : chunks_) {
      free_.emplace_back();
      for (int k = m->activation_slots(); k-- > 0;) free_.back().push_back(k);
    }
  }
  size_t bytes() const { return arena_.capacity(); }
  // The step's batches (one per microbatch) and loss scales; resets the sums.
  void start(std::vector<const Batch*> batches, double grad_scale, double aux_scale) {
    batches_ = std::move(batches), grad_scale_ = grad_scale, aux_scale_ = aux_scale;
    loss_ = aux_ = 0;
  }
  double loss() const { return loss_; }
  double aux() const { return aux_; }
  Tensor input(int mb, int c) override { return buffer(0, mb, c); }
  Tensor output(int mb, int c) override { return buffer(1, mb, c); }
  Tensor output_grad(int mb, int c) override { return buffer(2, mb, c); }
  Tensor input_grad(int mb, int c) override { return buffer(3, mb, c); }
  const Tensor& eval_input() const { return eval_input_; }
  void forward(int mb, int c) override {
    Model& m = *chunks_[c];
    if (m.last_stage()) return;  // its forward runs with its backward
    BRAID_CHECK(!free_[c].empty(), "pipeline: chunk ", c, " has no free activation slot for ",
                "microbatch ", mb, " (the schedule holds more than its ", m.activation_slots(),
                ")");
    int& slot = slot_of_[size_t(mb) * chunks_.size() + c];
    slot = free_[c].back();
    free_[c].pop_back();
    m.use_activations(slot);
    const Tensor in = input(mb, c);
    m.forward_for_backward(*batches_[mb], aux_scale_, m.first_stage() ? nullptr : &in);
    copy_tensor(backend_, output(mb, c), m.stage_output());
  }
  void backward(int mb, int c) override {
    Model& m = *chunks_[c];
    const Tensor in = input(mb, c), dout = output_grad(mb, c), din = input_grad(mb, c);
    const bool first = m.first_stage();
    Model::StepResult r;
    if (m.last_stage()) {
      r = m.forward_backward(*batches_[mb], grad_scale_, aux_scale_, first ? nullptr : &in, nullptr,
                             first ? nullptr : &din);
    } else {
      int& slot = slot_of_[size_t(mb) * chunks_.size() + c];
      m.use_activations(slot);
      r = m.backward_after_forward(*batches_[mb], grad_scale_, aux_scale_, &dout,
                                   first ? nullptr : &din);
      free_[c].push_back(slot);
      slot = -1;
    }
    loss_ += r.loss.sum, aux_ += r.aux;
  }

 private:
  // Buffer `which` (input, output, output gradient, input gradient) of (microbatch, chunk).
  const Tensor& buffer(int which, int mb, int c) const {
    const size_t per = buffers_.size() / 4;
    return buffers_[which * per + size_t(mb) * chunks_.size() + c];
  }
  Backend& backend_;
  std::vector<Model*> chunks_;
  Arena arena_;
  std::vector<Tensor> buffers_;
  Tensor eval_input_;
  std::vector<const Batch*> batches_;
  double grad_scale_ = 0, aux_scale_ = 0, loss_ = 0, aux_ = 0;
  std::vector<std::vector<int>> free_;  // [chunk]: its free activation slots
  std::vector<int> slot_of_;            // [microbatch, chunk]: the slot its forward used (or -1)
};

// The first layer of each pipeline piece (pp x virtual_stages of them): parallel.stage_starts, else
// those of the checkpoint being resumed (its config, when its pipeline has the same shape), else
// the pattern's '|' cuts, else balanced by per-layer times measured here and averaged over the
// ranks (so every rank cuts alike), on the training device and dtype. lead: this rank prints
// the measured times.
std::vector<int64_t> pipeline_starts(const RunConfig& cfg,
                                     const std::map<std::string, std::string>* resumed,
                                     Backend& backend, DType dtype, int64_t b, int64_t t_local,
                                     Communicator& world, bool lead) {
  const int pieces = cfg.parallel.pp * cfg.parallel.virtual_stages;
  const bool cut = cfg.model.pattern.find('|') != std::string::npos;
  std::string given = cfg.parallel.stage_starts;
  if (given.empty() && resumed) {
    auto get = [&](const std::string& k) {  // a config value without its quotes
      const auto it = resumed->find(k);
      std::string v = it == resumed->end() ? "" : it->second;
      v.erase(std::remove(v.begin(), v.end(), '"'), v.end());
      return v;
    };
    if (get("parallel.pp") == std::to_string(cfg.parallel.pp) &&
        get("parallel.virtual_stages") == std::to_string(cfg.parallel.virtual_stages))
      given = get("parallel.stage_starts");
  }
  if (given.empty()) {
    std::vector<double> costs;
    if (!cut) {
      costs = Model::layer_costs(cfg.model, backend, dtype, b, t_local);
      world.all_reduce(Tensor::contiguous_view(costs.data(), DType::f64, Device::cpu,
                                               {int64_t(costs.size())}, "layer_costs"),
                       ReduceOp::sum);
      std::string shown;
      for (double& c : costs) {
        c /= world.size();
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%s%.2f", shown.empty() ? "" : " ", c * 1e3);
        shown += buf;
      }
      if (lead)
        std::printf("pipeline: measured ms per layer (forward + backward of one microbatch): %s\n",
                    shown.c_str());
    }
    return Model::stage_starts(cfg.model, pieces, costs);
  }
  std::vector<int64_t> starts;
  std::stringstream in(given);
  for (std::string item; std::getline(in, item, ',');) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    BRAID_REQUIRE(!item.empty() && *end == 0, "parallel.stage_starts = '", given, "': '", item,
                  "' is not a layer number");
    starts.push_back(v);
  }
  const int64_t layers = static_cast<int64_t>(pattern_layers(cfg.model.pattern).size());
  bool ok = static_cast<int>(starts.size()) == pieces && starts[0] == 0;
  for (size_t i = 1; ok && i < starts.size(); ++i)
    ok = starts[i] > starts[i - 1] && starts[i] < layers;
  BRAID_REQUIRE(ok, "parallel.stage_starts = '", given, "' must list ", pieces,
                " increasing first layers starting at 0, each below the ", layers, " layers");
  BRAID_REQUIRE(!cut || starts == Model::stage_starts(cfg.model, pieces),
                "parallel.stage_starts = '", given, "' differs from the cuts of model.pattern '",
                cfg.model.pattern, "'");
  return starts;
}

}  // namespace

TrainSummary train(const RunConfig& cfg, Communicator* world) {
  const Layout layout = resolve_layout(cfg, world ? world->size() : 1);
  BRAID_REQUIRE(layout.etp == 1 || layout.etp == layout.tp, "parallel.etp = ", layout.etp,
                ": experts are split over the tensor-parallel ranks (etp = tp = ", layout.tp,
                ") or not at all (etp = 1)");
  BRAID_REQUIRE(cfg.train.seq_len % layout.cp == 0, "parallel.cp = ", layout.cp,
                " must divide train.seq_len = ", cfg.train.seq_len,
                " (each context-parallel rank holds an equal shard of every sequence)");
  const int dp = layout.dp, cp = layout.cp, pp = layout.pp, rank = world ? world->rank() : 0;
  const int vs = layout.virtual_stages;
  BRAID_REQUIRE(pp == 1 || cfg.train.grad_accum >= pp, "parallel.pp = ", pp,
                " needs train.grad_accum >= pp (the pipeline's microbatches), got ",
                cfg.train.grad_accum);
  BRAID_REQUIRE(vs >= 1 && (vs == 1 || (pp > 1 && cfg.train.grad_accum % pp == 0)),
                "parallel.virtual_stages = ", vs,
                " must be 1, or (interleaved pipeline) at least 2 with parallel.pp > 1 and "
                "train.grad_accum a multiple of parallel.pp (pp = ",
                pp, ", grad_accum = ", cfg.train.grad_accum, ")");
  // This rank's groups (collective): data parallel (which samples), tensor parallel, context
  // parallel (which shard of each sequence), and data x context parallel, over which the
  // gradients are summed and ZeRO-1 shards the optimizer.
  // Expert parallelism adds the expert-parallel group (which experts) and the expert-data-parallel
  // group (the ranks holding the same experts, over which their gradients are summed).
  // Pipeline parallelism adds the pipeline group (stage = its rank) and, with tied embeddings, the
  // first and last stages' pair that sums the embedding table's gradient.
  std::unique_ptr<Communicator> dp_group, tp_group, cp_group, grad_group, ep_group, edp_group,
      pp_group, tied_group;
  int dp_rank = 0, tp_rank = 0, cp_rank = 0, grad_rank = 0, edp_rank = 0, stage = 0;
  if (world && world->size() > 1) {
    const RankGrid grid(layout, world->size());
    dp_group = make_group(*world, grid, Dim::dp);
    tp_group = make_group(*world, grid, Dim::tp);
    cp_group = make_group(*world, grid, Dim::cp);
    grad_group = make_data_group(*world, grid);
    dp_rank = dp_group->rank(), tp_rank = tp_group->rank(), cp_rank = cp_group->rank();
    grad_rank = grad_group->rank();
    if (layout.ep > 1) {
      ep_group = make_group(*world, grid, Dim::ep);
      edp_group = make_group(*world, grid, Dim::edp);
      edp_rank = edp_group->rank();
    }
    if (pp > 1) {
      pp_group = make_group(*world, grid, Dim::pp);
      stage = pp_group->rank();
      const bool ends = stage == 0 || stage == pp - 1;
      auto pair = pp_group->split(ends ? 0 : 1, stage, "tied_embeddings");
      if (ends && cfg.model.tie_embeddings) tied_group = std::move(pair);
    }
  }
  const bool lead = rank == 0;  // rank 0 prints and writes files
  auto say = [&](const char* fmt, auto... args) {
    if (lead) std::printf(fmt, args...);
  };
  // On GPUs: one rank per GPU, data, tensor, expert, pipeline and context parallel over NCCL.
  const bool gpu = cfg.train.device == "cuda";
  if (cfg.train.threads > 0) omp_set_num_threads(static_cast<int>(cfg.train.threads));
  const TrainSettings& ts = cfg.train;
  const int64_t b = ts.micro_batch, t = ts.seq_len, t_local = t / cp;
  const DType act_dtype = ts.precision == "bf16" ? DType::bf16 : DType::f32;  // the activations'

  Dataset train_data(cfg.data.train, t), valid_data(cfg.data.valid, t);
  BRAID_REQUIRE(cfg.model.vocab_size >= int64_t(train_data.vocab_size()),
                "model.vocab_size = ", cfg.model.vocab_size,
                " is smaller than the vocabulary of the training data (", train_data.vocab_size(),
                ", in '", cfg.data.train[0], "')");
  BRAID_REQUIRE(valid_data.vocab_size() == train_data.vocab_size(),
                "data.valid shards have vocabulary ", valid_data.vocab_size(),
                ", data.train shards ", train_data.vocab_size());

  auto host_backend = make_cpu_backend();
  auto backend = gpu ? make_cuda_backend(gpu_of_rank(rank)) : make_cpu_backend();
  // The gradients' reduction and ZeRO-1 over NCCL (GPU tensors; a group of one too, as ZeRO-1
  // runs on every multi-rank layout); grad_group stays the MPI group for host values.
  std::unique_ptr<Communicator> grad_nccl;
  if (gpu && grad_group)
    grad_nccl = make_nccl(*grad_group, "data parallel (NCCL)", comm_timeout_from_env(600));
  Communicator* data_comm = grad_nccl ? grad_nccl.get() : grad_group.get();
  // Tensor parallelism on GPUs: the blocks' and the optimizer's collectives over NCCL.
  std::unique_ptr<Communicator> tp_nccl;
  if (gpu && tp_group && tp_group->size() > 1)
    tp_nccl = make_nccl(*tp_group, "tensor parallel (NCCL)", comm_timeout_from_env(600));
  Communicator* tp_comm = tp_nccl ? tp_nccl.get() : tp_group.get();
  // Context parallelism on GPUs: the blocks' gathers and state maps over NCCL; the MPI cp group
  // keeps the host sums (the held-out loss).
  std::unique_ptr<Communicator> cp_nccl;
  if (gpu && cp > 1)
    cp_nccl = make_nccl(*cp_group, "context parallel (NCCL)", comm_timeout_from_env(600));
  Communicator* cp_comm = cp_nccl ? cp_nccl.get() : cp_group.get();
  // Expert parallelism on GPUs: the token rows' all-to-all and the experts' ZeRO-1 over NCCL; the
  // MPI ep group keeps the host sums (the experts' gradient norm).
  std::unique_ptr<Communicator> ep_nccl, edp_nccl;
  if (gpu && ep_group) {
    ep_nccl = make_nccl(*ep_group, "expert parallel (NCCL)", comm_timeout_from_env(600));
    edp_nccl = make_nccl(*edp_group, "expert data parallel (NCCL)", comm_timeout_from_env(600));
  }
  Communicator* ep_comm = ep_nccl ? ep_nccl.get() : ep_group.get();
  Communicator* edp_comm = edp_nccl ? edp_nccl.get() : edp_group.get();
  // Pipeline parallelism on GPUs: the activations and their gradients between the stages, and the
  // tied embedding table's gradient, over NCCL; the MPI pp group keeps the host sums (the losses,
  // the gradient norm).
  std::unique_ptr<Communicator> pp_nccl, tied_nccl;
  if (gpu && pp_group) {
    pp_nccl = make_nccl(*pp_group, "pipeline (NCCL)", comm_timeout_from_env(600));
    if (tied_group)
      tied_nccl = make_nccl(*tied_group, "tied embeddings (NCCL)", comm_timeout_from_env(600));
  }
  Communicator* pp_comm = pp_nccl ? pp_nccl.get() : pp_group.get();
  Communicator* tied_comm = tied_nccl ? tied_nccl.get() : tied_group.get();
  // The checkpoint to resume from (checkpoint.resume): the newest that checks out.
  const std::string ckpt_dir = ckpt_dir_of(cfg);
  std::vector<std::string> skipped;  // corrupt or incomplete, newest first
  const std::string latest =
      cfg.checkpoint.resume ? latest_valid_checkpoint(ckpt_dir, &skipped) : "";
  const CheckpointMeta resumed = latest.empty() ? CheckpointMeta{} : read_checkpoint_meta(latest);
  // The resolved configuration records the pipeline's cuts, so a resumed or repeated run cuts the
  // same way.
  RunConfig run_cfg = cfg;
  std::vector<int64_t> starts{0};
  if (pp > 1) {
    starts = pipeline_starts(cfg, latest.empty() ? nullptr : &resumed.config, *backend, act_dtype,
                             b, t_local, *world, lead);
    std::string text;
    for (int64_t v : starts) text += (text.empty() ? "" : ",") + std::to_string(v);
    run_cfg.parallel.stage_starts = text;
    say("pipeline: %d stages x %d chunks, first layers %s\n", pp, vs, text.c_str());
  }
  const std::string yaml = config_to_yaml(run_cfg);
  if (lead) {
    std::filesystem::create_directories(ts.out_dir);
    std::ofstream(std::filesystem::path(ts.out_dir) / "config.yaml") << yaml;
  }
  say("resolved config (also in %s/config.yaml):\n%s", ts.out_dir.c_str(), yaml.c_str());

  // Parameters padded to a multiple of dp x cp elements: ZeRO-1 shards are equal.
  // Expert weights (expert parallelism) padded to a multiple of the expert-data-parallel size.
  // This rank's model chunks: piece c pp + stage for c < virtual_stages (one chunk without
  // interleaving); `model` is the first.
  std::vector<std::unique_ptr<Model>> chunks;
  std::vector<Model*> chunk_ptrs;
  std::vector<ParamSet*> sets;
  // The step's pipeline schedule; each chunk before the model's last keeps the activations of as
  // many microbatches as the schedule holds on it at once.
  const PipeTable schedule = make_schedule(
      vs > 1 ? PipeSchedule::interleaved : PipeSchedule::one_f_one_b, pp, int(ts.grad_accum), vs);
  const std::vector<int> in_flight = chunk_peak_in_flight(schedule, stage);
  for (int c = 0; c < vs; ++c) {
    const bool last_piece = c * pp + stage == pp * vs - 1;
    const int slots = last_piece ? 1 : in_flight[c];
    const std::string hint =
        std::string("lower train.micro_batch or train.seq_len") +
        (cfg.train.recompute == "full" ? "" : ", set train.recompute to ssm or full") +
        (slots > 1 ? ", lower train.grad_accum (this pipeline stage holds the activations of " +
                         std::to_string(slots) + " microbatches)"
                   : "") +
        ", or split the model over more GPUs (parallel.tp, parallel.pp)";
    chunks.push_back(with_memory_hint(hint, [&] {
      return std::make_unique<Model>(cfg.model, act_dtype, *backend, b, t_local, int64_t(dp) * cp,
                                     TensorParallel{tp_comm, layout.sequence_parallel},
                                     cp > 1 ? cp_comm : nullptr, ep_comm,
                                     edp_group ? edp_group->size() : 1, c * pp + stage, starts,
                                     parse_recompute(cfg.train.recompute), slots);
    }));
    chunks.back()->initialize(ts.seed);
    chunk_ptrs.push_back(chunks.back().get());
    sets.push_back(&chunks.back()->params());
  }
  Model& model = *chunks[0];
  // What the other ranks hold: every chunk's remote parameters less those of this rank's chunks.
  std::vector<RemoteParam> remote;
  std::set<std::string> named;  // this rank's parameters, then the remote ones listed
  for (const auto& m : chunks)
    for (const Param& p : m->params().all()) named.insert(p.name);
  for (const auto& m : chunks)
    for (const RemoteParam& r : m->remote_params())
      if (named.insert(r.name).second) remote.push_back(r);
  RunOptimizer opt = with_memory_hint(
      "the optimizer state (f32 master values and Adam moments of every parameter held) does not "
      "fit beside the model: shard it over more GPUs (ZeRO-1 over data-parallel ranks, "
      "parallel.tp, parallel.pp, parallel.ep) or train a smaller model",
      [&] {
        return RunOptimizer(sets, cfg.adamw, *backend, data_comm, tp_comm, edp_comm, ep_group.get(),
                            pp_group.get(), remote);
      });
  // Whole samples, and (context parallel) this rank's shard of them, which the model reads.
  // Under pipeline parallelism every microbatch of a step is held at once (the schedule
  // interleaves them).
  const int64_t held = pp > 1 ? ts.grad_accum : 1;
  // On the GPU the model reads a device copy of each (device).
  std::vector<std::unique_ptr<BatchBuffers>> wholes, shards, device;
  for (int64_t i = 0; i < held; ++i) {
    wholes.push_back(std::make_unique<BatchBuffers>(*host_backend, b, t));
    shards.push_back(std::make_unique<BatchBuffers>(*host_backend, b, t_local));
    if (gpu) device.push_back(std::make_unique<BatchBuffers>(*backend, b, t_local));
  }
  auto input_of = [&](int64_t i) -> const Batch& {
    return gpu ? device[i]->batch : cp > 1 ? shards[i]->batch : wholes[i]->batch;
  };
  const BatchBuffers& whole = *wholes[0];
  const Batch& input = input_of(0);
  // This rank's shard of whole sample i (context parallel), and its device copy (GPU).
  auto take_shard = [&](int64_t i = 0) {
    if (cp > 1)
      for (int f = 0; f < 4; ++f) {
        const Tensor &from = field(wholes[i]->batch, f), &to = field(shards[i]->batch, f);
        for (int64_t r = 0; r < b; ++r)
          std::memcpy(to.ptr<int32_t>() + r * t_local,
                      from.ptr<int32_t>() + r * t + cp_rank * t_local,
                      size_t(t_local) * sizeof(int32_t));
      }
    if (gpu)
      for (int f = 0; f < 4; ++f) {
        const Tensor &from = field(cp > 1 ? shards[i]->batch : wholes[i]->batch, f),
                     &to = field(device[i]->batch, f);
        backend->copy(to.data, Device::cuda, from.data, Device::cpu, from.nbytes(), {});
      }
  };
  Sampler sampler(train_data, ts.seed, true), valid_sampler(valid_data, ts.seed, false);

  // Pipeline stages hold every microbatch's stage input, output and their gradients (activations).
  const int64_t stage_rows =
      layout.sequence_parallel && layout.tp > 1 ? b * t_local / layout.tp : b * t_local;
  std::unique_ptr<StageRun> stage_run;
  if (pp > 1)
    stage_run = with_memory_hint(
        "the pipeline's stage buffers do not fit: lower train.grad_accum or train.micro_batch",
        [&] {
          return std::make_unique<StageRun>(*backend, chunk_ptrs, ts.grad_accum, stage_rows,
                                            cfg.model.d_model);
        });
  MemoryReport mem;
  if (stage_run) mem.activations += stage_run->bytes();
  double flops_tok = 0;
  int64_t held_params = 0, held_trainable = 0;
  for (const auto& m : chunks) {
    const MemoryReport r = m->memory();
    mem.parameters += r.parameters, mem.gradients += r.gradients;
    mem.activations += r.activations, mem.scratch += r.scratch;
    flops_tok += m->flops_per_token(t);
    held_params += m->params().numel(), held_trainable += m->params().numel(true);
  }
  if (pp > 1)  // the whole model's FLOPs per token (MFU): the stages' pieces summed
    pp_group->all_reduce(Tensor::contiguous_view(&flops_tok, DType::f64, Device::cpu, {1}, "flops"),
                         ReduceOp::sum);
  say("layout: %d ranks, tp %d%s, cp %d, dp %d, ep %d (expert data parallel %d), pp %d\n",
      world ? world->size() : 1, layout.tp,
      layout.tp > 1 && layout.sequence_parallel ? " (sequence parallel)" : "", cp, dp, layout.ep,
      edp_group ? edp_group->size() : dp * cp, pp);
  say("model: pattern %s, %lld parameters (%lld trainable), %.3g GFLOP per token (fwd+bwd)\n",
      cfg.model.pattern.c_str(), (long long)held_params, (long long)held_trainable,
      flops_tok / 1e9);
  const size_t optimizer_bytes = opt.state_bytes();
  say("memory: parameters %s, gradients %s, optimizer %s, activations %s, scratch %s\n",
      mib(mem.parameters).c_str(), mib(mem.gradients).c_str(), mib(optimizer_bytes).c_str(),
      mib(mem.activations).c_str(), mib(mem.scratch).c_str());
  if (gpu) {  // the plan beside what the device reports (the CUDA context adds its own)
    const DeviceMemory dm = cuda_memory_info();
    const size_t planned =
        mem.parameters + mem.gradients + optimizer_bytes + mem.activations + mem.scratch;
    say("GPU memory: planned %s, allocated by Braid %s, in use on the device %s of %s "
        "(cudaMemGetInfo)\n",
        mib(planned).c_str(), mib(backend->bytes_in_use()).c_str(), mib(dm.total - dm.free).c_str(),
        mib(dm.total).c_str());
  }
  say("data: %lld train tokens (%lld samples of %lld), %lld held-out tokens; %d threads\n",
      (long long)train_data.num_tokens(), (long long)train_data.num_samples(), (long long)t,
      (long long)valid_data.num_tokens(), omp_get_max_threads());
  const double entropy = train_data.unigram_entropy();
  say("unigram entropy of the training tokens: %.4f nats/token\n", entropy);
  if (lead) std::fflush(stdout);

  // Resume from the newest checkpoint when asked and one exists.
  int64_t start_step = 0, consumed = 0;
  if (cfg.checkpoint.resume) {
    for (const std::string& why : skipped)
      say("warning: skipping a checkpoint that does not check out: %s\n", why.c_str());
    if (latest.empty()) {
      say("checkpoint.resume: no checkpoint in %s, starting at step 0\n", ckpt_dir.c_str());
    } else {
      const CheckpointMeta& meta = resumed;
      // The model, and what defines the sample order, must match; batch sizes may change.
      const std::vector<std::string> diffs =
          config_differences(meta.config, config_entries(cfg),
                             {"model.", "mamba1.", "mamba2.", "attention.", "mlp.", "moe.",
                              "train.seed", "train.seq_len"});
      std::string all;
      for (const std::string& d : diffs) all += (all.empty() ? "" : "; ") + d;
      BRAID_REQUIRE(diffs.empty(), "cannot resume from ", latest,
                    ": the configuration differs: ", all);
      BRAID_REQUIRE(meta.step < ts.steps, "checkpoint ", latest, " is at step ", meta.step,
                    ", not before train.steps = ", ts.steps, ": nothing to train");
      const auto l0 = Clock::now();
      opt.load(latest, meta.step);
      start_step = meta.step, consumed = meta.consumed_samples;
      say("resumed from %s at step %lld (%lld samples consumed; loaded in %.2f s)\n",
          latest.c_str(), (long long)start_step, (long long)consumed,
          std::chrono::duration<double>(Clock::now() - l0).count());
    }
  }
  // The crash-loop guard: rank 0 counts this run's start; every rank learns the verdict.
  {
    std::string loop;
    if (lead) {
      try {
        begin_attempt(ckpt_dir, start_step, cfg.checkpoint.max_attempts);
      } catch (const CrashLoop& e) {
        loop = e.what();
      }
    }
    int32_t flag = loop.empty() ? 0 : 1;
    if (world && world->size() > 1)
      world->all_reduce(Tensor::contiguous_view(&flag, DType::i32, Device::cpu, {1}, "loop"),
                        ReduceOp::max);
    if (flag) throw CrashLoop(loop.empty() ? "crash loop (see rank 0)" : loop);
  }
  std::unique_ptr<MetricsLog> metrics;  // written by rank 0
  if (lead)
    metrics = std::make_unique<MetricsLog>(
        (std::filesystem::path(ts.out_dir) / "metrics.jsonl").string(), start_step > 0);
  AsyncCheckpointWriter writer;              // checkpoint.async, one process
  AsyncShardedWriter sharded_writer(world);  // checkpoint.async, several ranks (collective)
  // A GPU run's state is staged into host mirrors (RunOptimizer::checkpoint_state): the copies
  // overlap the next step, and the writer waits for them (ready).
  // copied: seconds from staging to the end of the copies (a GPU run's, for the save's message).
  std::atomic<double> copied{0};
  Clock::time_point staged_at;
  auto ready = [&] {
    opt.wait_staged();
    copied = std::chrono::duration<double>(Clock::now() - staged_at).count();
  };
  if (cfg.checkpoint.interval > 0 || cfg.checkpoint.save_final) opt.prepare_checkpoints();
  auto gb = [](size_t bytes) { return double(bytes) / 1e9; };
  auto save = [&](int64_t steps_done) {
    CheckpointMeta meta{steps_done, consumed, ts.seed, config_entries(run_cfg)};
    const auto c0 = Clock::now();
    writer.wait();  // the previous save is done with the staging memory
    sharded_writer.finish();
    staged_at = Clock::now();
    if (opt.sharded()) {  // every rank writes its shard; collective
      const std::vector<CheckpointPiece> pieces =
          opt.shard_pieces(grad_rank == 0, edp_rank == 0, tp_rank == 0);
      size_t bytes = 0;  // this rank's
      for (const CheckpointPiece& p : pieces) bytes += size_t(p.count) * dtype_size(p.dtype);
      if (cfg.checkpoint.async) {
        auto done = [&](const std::string& dir) {
          if (!lead) return;
          prune_checkpoints(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every);
          say("saved checkpoint %s (%d ranks wrote their shards in the background)\n", dir.c_str(),
              world->size());
          std::fflush(stdout);
        };
        if (gpu)
          sharded_writer.submit_staged(ckpt_dir, meta, pieces, ready, done);
        else
          sharded_writer.submit(ckpt_dir, meta, pieces, done);
        say("checkpoint of step %lld staged in %.3f s (training blocked); every rank writes its "
            "shard in the background\n",
            (long long)steps_done, std::chrono::duration<double>(Clock::now() - c0).count());
        return;
      }
      ready();
      const std::string dir = save_checkpoint_sharded(ckpt_dir, meta, pieces, world);
      if (!lead) return;
      prune_checkpoints(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every);
      const double secs = std::chrono::duration<double>(Clock::now() - c0).count();
      say("saved checkpoint %s (%d ranks wrote their shards, rank 0 %.2f GB; %.2f s, %.2f GB/s "
          "for rank 0)\n",
          dir.c_str(), world->size(), gb(bytes), secs, gb(bytes) / secs);
      std::fflush(stdout);
      return;
    }
    const std::vector<CheckpointTensor> state = opt.checkpoint_state();
    size_t bytes = 0;
    for (const CheckpointTensor& c : state) bytes += c.tensor.nbytes();
    if (cfg.checkpoint.async) {
      auto done = [&, bytes](const std::string& dir, double secs) {
        prune_checkpoints(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every);
        char copy[64] = "";
        if (gpu)
          std::snprintf(copy, sizeof(copy), "; copied from the GPU in %.2f s", copied.load());
        say("saved checkpoint %s (%.2f GB written in the background in %.2f s, %.2f GB/s%s)\n",
            dir.c_str(), gb(bytes), secs, gb(bytes) / secs, copy);
        std::fflush(stdout);
      };
      if (gpu)
        writer.submit_staged(ckpt_dir, meta, state, ready, done);
      else
        writer.submit(ckpt_dir, meta, state, done);
      say("checkpoint of step %lld staged in %.3f s (training blocked); writing in the "
          "background\n",
          (long long)steps_done, std::chrono::duration<double>(Clock::now() - c0).count());
    } else {
      ready();
      const std::string dir = save_checkpoint(ckpt_dir, meta, state);
      prune_checkpoints(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every);
      const double secs = std::chrono::duration<double>(Clock::now() - c0).count();
      say("saved checkpoint %s (%.2f GB in %.2f s, %.2f GB/s)\n", dir.c_str(), gb(bytes), secs,
          gb(bytes) / secs);
    }
    std::fflush(stdout);
  };
  const int64_t valid_rows = std::min(ts.eval_batches * b, valid_data.num_samples());
  auto evaluate = [&]() {
    double sum = 0;
    int64_t count = 0;
    for (int64_t first = 0; first + b <= std::max(valid_rows, b); first += b) {
      fill(valid_data, valid_sampler, first, whole.batch);
      take_shard();
      // Through the pipeline: piece k (chunk k / pp of stage k % pp) takes piece k - 1's output.
      for (int k = 0; k < pp * vs; ++k) {
        if (k % pp != stage) continue;
        Model& m = *chunks[k / pp];
        if (k > 0) pp_comm->recv(stage_run->eval_input(), (k - 1) % pp);
        const LossSum l = m.evaluate(input, k > 0 ? &stage_run->eval_input() : nullptr);
        if (k + 1 < pp * vs) pp_comm->send(m.stage_output(), (k + 1) % pp);
        sum += l.sum, count += l.count;
      }
    }
    if (pp > 1) {  // the last stage's
      std::vector<double> sums{sum, double(count)};
      pp_group->all_reduce(
          Tensor::contiguous_view(sums.data(), DType::f64, Device::cpu, {2}, "eval"),
          ReduceOp::sum);
      sum = sums[0], count = int64_t(sums[1]);
    }
    if (cp > 1) {  // every shard's tokens
      std::vector<double> sums{sum, double(count)};
      cp_group->all_reduce(
          Tensor::contiguous_view(sums.data(), DType::f64, Device::cpu, {2}, "eval"),
          ReduceOp::sum);
      sum = sums[0], count = int64_t(sums[1]);
    }
    return sum / double(count);
  };

  // The global batch: dp ranks x grad_accum microbatches x B samples. Microbatch m of a step takes
  // the next dp * B samples of the global order; rank r takes B of them, from offset r * B.
  const int64_t tokens_per_step = ts.grad_accum * dp * b * t;
  // Model FLOPs utilisation against the bf16 dense peak of an H100/H200 SXM (GPU runs).
  constexpr double kPeakFlops = 989e12;
  const int ranks = world ? world->size() : 1;
  TrainSummary s;
  s.unigram_entropy = entropy;
  // The seconds this rank's communicators held up the step (call_seconds), summed over the
  // distinct groups.
  auto comm_seconds = [&,
                       groups = std::set<const Communicator*>{
                           world, data_comm, tp_comm, cp_comm, cp_group.get(), ep_comm, edp_comm,
                           ep_group.get(), grad_group.get(), pp_group.get(), pp_comm, tied_comm}] {
    double sum = 0;
    for (const Communicator* c : groups)
      if (c) sum += c->call_seconds();
    return sum;
  };
  const auto t0 = Clock::now();
  auto last = t0;
  double interval_loss = 0, interval_comm = 0, comm_before = comm_seconds();
  // Pipeline runs: the step's bubble, 1 - the stages' busy time / (pp x the longest stage's run),
  // each measured with events on its own stream, and the schedule's in theory (equal stages).
  double bubble = 0, interval_bubble = 0;
  const double bubble_theory =
      pp > 1 ? theoretical_bubble(pp, int(ts.grad_accum), schedule.chunks) : 0.0;
  int64_t interval_steps = 0;
  // Gradient buckets: the replicated parameters' gradients summed over the data group while the
  // last microbatch's backward goes on (pipeline runs reduce after their schedule).
  std::unique_ptr<GradBuckets> buckets;
  if (pp == 1 && data_comm && data_comm->size() > 1 && layout.grad_bucket_mb > 0) {
    const Tensor grads = model.params().region_grads(0);
    buckets = std::make_unique<GradBuckets>(
        grads, *data_comm, std::max<int64_t>(1, int64_t(layout.grad_bucket_mb * 1e6 / 4)));
    say("gradients: %d buckets of about %.3g MB summed during the backward\n", buckets->buckets(),
        double(grads.nbytes()) / buckets->buckets() / 1e6);
  }
  // The auxiliary (MoE) losses of the step are the mean of every microbatch's on every data and
  // context rank (as logged), and the gradients are summed over those ranks: each microbatch's
  // auxiliary gradient is scaled by 1 / (grad_accum dp cp).
  const double aux_scale = 1.0 / double(ts.grad_accum * dp * cp);
  for (int64_t step = start_step; step < ts.steps; ++step) {
    for (const auto& m : chunks) m->params().zero_grads();
    double loss_sum = 0, aux = 0;
    if (pp == 1) {
      for (int64_t micro = 0; micro < ts.grad_accum; ++micro) {
        fill(train_data, sampler, consumed + dp_rank * b, whole.batch);
        take_shard();
        consumed += dp * b;
        if (buckets && micro + 1 == ts.grad_accum)
          model.set_grads_ready([&](int64_t offset) { buckets->ready_from(offset); });
        const Model::StepResult r =
            model.forward_backward(input, 1.0 / double(tokens_per_step), aux_scale);
        model.set_grads_ready(nullptr);
        loss_sum += r.loss.sum;
        aux += r.aux / double(ts.grad_accum);
      }
    } else {  // every stage reads the same samples; the schedule runs the microbatches
      std::vector<const Batch*> batches;
      for (int64_t micro = 0; micro < ts.grad_accum; ++micro) {
        fill(train_data, sampler, consumed + dp_rank * b, wholes[micro]->batch);
        take_shard(micro);
        consumed += dp * b;
        batches.push_back(&input_of(micro));
      }
      stage_run->start(batches, 1.0 / double(tokens_per_step), aux_scale);
      const PipeRunStats run = run_pipeline(schedule, *stage_run, *pp_comm, *backend);
      std::vector<double> sums{stage_run->loss(), stage_run->aux() / double(ts.grad_accum),
                               run.busy_s};
      pp_group->all_reduce(  // the last stage's loss, every stage's auxiliary losses, busy times
          Tensor::contiguous_view(sums.data(), DType::f64, Device::cpu, {3}, "stage_loss"),
          ReduceOp::sum);
      double makespan = run.total_s;  // the longest stage's run
      pp_group->all_reduce(Tensor::contiguous_view(&makespan, DType::f64, Device::cpu, {1}, "span"),
                           ReduceOp::max);
      loss_sum = sums[0], aux = sums[1];
      bubble = makespan > 0 ? 1.0 - sums[2] / (pp * makespan) : 0.0;
      // Tied embeddings: the table's gradient is the first stage's lookup plus the last stage's
      // output projection.
      if (tied_comm)
        tied_comm->all_reduce((stage == 0 ? chunks.front() : chunks.back())->embeddings()->grad,
                              ReduceOp::sum);
    }
    if (dp * cp > 1) {  // the global batch's loss: sum over the data and context ranks
      std::vector<double> sums{loss_sum, aux};
      grad_group->all_reduce(
          Tensor::contiguous_view(sums.data(), DType::f64, Device::cpu, {2}, "loss"),
          ReduceOp::sum);
      loss_sum = sums[0], aux = sums[1] / (dp * cp);
    }
    const double loss = loss_sum / double(tokens_per_step);
    if (buckets) buckets->finish();  // before anything else writes the gradients
    for (const auto& m : chunks) m->reduce_sequence_parallel_grads();
    const double norm = opt.reduce_and_norm(buckets != nullptr);
    BRAID_REQUIRE(std::isfinite(norm) && std::isfinite(loss), "step ", step + 1,
                  ": non-finite loss (", loss, ") or gradient norm (", norm,
                  "); lower optim.lr or check the data");
    const double lr = cfg.lr.at(step);
    opt.step(lr, norm);
    if (dp * cp > 1)  // the balancing rule sees the whole global batch on every rank
      for (const auto& m : chunks)
        for (const Tensor& counts : m->moe_step_counts())
          data_comm->all_reduce(counts, ReduceOp::sum);
    for (const auto& m : chunks) m->after_optimizer_step();
    const double comm_now = comm_seconds(), comm = comm_now - comm_before;
    comm_before = comm_now;
    interval_loss += loss, interval_comm += comm, interval_bubble += bubble, ++interval_steps;
    const auto now = Clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    const double elapsed = std::chrono::duration<double>(now - t0).count();
    last = now;
    if (metrics)
      metrics->write("train",
                     {{"step", double(step + 1)},
                      {"loss", loss},
                      {"aux_loss", aux},
                      {"lr", lr},
                      {"grad_norm", norm},
                      {"tokens_per_s", tokens_per_step / dt},
                      {"gflops_per_s", tokens_per_step * flops_tok / dt / 1e9},
                      {"mfu", gpu ? tokens_per_step * flops_tok / dt / kPeakFlops / ranks : 0.0},
                      {"comm_s", comm},
                      {"pp_bubble", bubble},
                      {"pp_bubble_theory", bubble_theory},
                      {"elapsed_s", elapsed}});
    if ((step + 1) % ts.log_interval == 0 || step + 1 == ts.steps) {
      s.final_train_loss = interval_loss / double(interval_steps);
      const double per_step = elapsed / double(step + 1 - start_step);
      char mfu[128] = "";
      if (gpu)
        std::snprintf(mfu, sizeof(mfu), " | MFU %.1f%%",
                      100 * tokens_per_step * flops_tok / per_step / kPeakFlops / ranks);
      if (ranks > 1)  // rank 0's communication time per step over the interval
        std::snprintf(mfu + std::strlen(mfu), sizeof(mfu) - std::strlen(mfu), " | comm %.0f ms",
                      1e3 * interval_comm / double(interval_steps));
      if (pp > 1)
        std::snprintf(mfu + std::strlen(mfu), sizeof(mfu) - std::strlen(mfu),
                      " | bubble %.1f%% (theory %.1f%%)",
                      100 * interval_bubble / double(interval_steps), 100 * bubble_theory);
      say("step %5lld/%lld | loss %.4f | aux %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | "
          "%.2f GFLOP/s%s | elapsed %s | remaining %s\n",
          (long long)(step + 1), (long long)ts.steps, s.final_train_loss, aux, lr, norm,
          tokens_per_step / per_step, tokens_per_step * flops_tok / per_step / 1e9, mfu,
          hms(elapsed).c_str(), hms(per_step * double(ts.steps - step - 1)).c_str());
      if (lead) std::fflush(stdout);
      interval_loss = 0, interval_comm = 0, interval_bubble = 0, interval_steps = 0;
    }
    if ((step + 1) % ts.eval_interval == 0 || step + 1 == ts.steps) {
      s.final_valid_loss = evaluate();
      if (metrics)
        metrics->write("eval", {{"step", double(step + 1)}, {"valid_loss", s.final_valid_loss}});
      say("eval  %5lld/%lld | held-out loss %.4f nats/token (%lld tokens)\n", (long long)(step + 1),
          (long long)ts.steps, s.final_valid_loss,
          (long long)(std::max(valid_rows, b) / b * b * t));
      if (lead) std::fflush(stdout);
    }
    const bool saved = (cfg.checkpoint.interval > 0 && (step + 1) % cfg.checkpoint.interval == 0) ||
                       (step + 1 == ts.steps && cfg.checkpoint.save_final);
    if (saved) save(step + 1);
    sharded_writer.poll();  // commits a background save once every rank has written its file
    if (step + 1 < ts.steps && stop_requested(world)) {  // collective, every step
      if (!saved) save(step + 1);
      say("stopped on SIGUSR1 after step %lld: checkpoint saved, exiting for a requeue\n",
          (long long)(step + 1));
      s.stopped_on_signal = true;
      s.steps = step + 1 - start_step;
      break;
    }
  }
  writer.wait();  // the last checkpoint is committed before the run counts as ended
  sharded_writer.finish();
  if (lead) end_attempt(ckpt_dir);
  if (!s.stopped_on_signal) s.steps = ts.steps - start_step;
  s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return s;
}

}  // namespace braid
