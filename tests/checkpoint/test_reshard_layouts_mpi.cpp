// Resharding across expert- and pipeline-parallel layouts (under mpirun with 4 ranks), through the
// trainer's optimizer (launch/run_optimizer.h): a model of Mamba-2, attention and MoE layers
// (4 experts, tied embeddings) takes two ZeRO-1 steps with synthetic gradients on ep=2 x dp=4
// (each expert on two ranks) and saves a sharded checkpoint. Then, bit for bit against that
// checkpoint loaded whole by one process (every rank loads it so, separately):
//   - what each ep=2 rank saved (its parameters, its runs of the masters and moments);
//   - what each rank holds after loading it on ep=4 (one expert per rank) and on pp=2 x dp=2
//     (two stages, the tied table mirrored on the last);
//   - the pp=2 x dp=2 layout saves again, and that checkpoint loaded whole equals the first:
// the ep2 x dp2 -> ep4, ep2 -> pp2 and pp2 -> pp1 reshards lose nothing (loading copies, it
// computes nothing).
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "launch/run_optimizer.h"
#include "layers/model/model.h"
#include "parallel/communicator.h"
#include "parallel/launch_env.h"
#include "parallel/rank_grid.h"
#include "tests/checkpoint/reshard_util.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace braid;

ModelConfig config() {
  return test::reshard_config(true);
}

using test::fake_grads;

// One rank of a layout: its groups, model and optimizer, built as the trainer builds them.
struct Run {
  std::unique_ptr<Communicator> dp, tp, ep, edp, pp;
  std::unique_ptr<Model> model;
  std::unique_ptr<RunOptimizer> opt;
  int grad_rank = 0, edp_rank = 0;
};
std::unique_ptr<Run> make_run(Communicator& world, Backend& backend, Layout l) {
  auto run = std::make_unique<Run>();
  const RankGrid grid(l, world.size());
  run->dp = make_data_group(world, grid);
  run->tp = make_group(world, grid, Dim::tp);
  if (l.ep > 1)
    run->ep = make_group(world, grid, Dim::ep), run->edp = make_group(world, grid, Dim::edp);
  int stage = 0;
  std::vector<int64_t> starts{0};
  if (l.pp > 1) {
    run->pp = make_group(world, grid, Dim::pp);
    stage = run->pp->rank();
    starts = Model::stage_starts(config(), l.pp);
  }
  run->grad_rank = run->dp->rank(), run->edp_rank = run->edp ? run->edp->rank() : 0;
  run->model = std::make_unique<Model>(config(), DType::f32, backend, 1, 8, run->dp->size(),
                                       TensorParallel{}, nullptr, run->ep.get(),
                                       run->edp ? run->edp->size() : 1, stage, starts);
  run->model->initialize(3);
  run->opt = std::make_unique<RunOptimizer>(
      std::vector<ParamSet*>{&run->model->params()}, AdamWConfig{}, backend, run->dp.get(),
      run->tp.get(), run->edp.get(), run->ep.get(), run->pp.get(), run->model->remote_params());
  return run;
}

// Every tensor of a checkpoint loaded whole by one process, by "kind/name".
std::map<std::string, std::vector<float>> load_whole(const std::string& dir, Backend& backend) {
  Model single(config(), DType::f32, backend, 1, 8);
  single.initialize(5);
  AdamW adam(single.params(), AdamWConfig{}, backend);
  load_checkpoint(dir, single.params(), adam);
  std::map<std::string, std::vector<float>> out;
  for (const CheckpointTensor& t : training_state(single.params(), adam)) {
    const float* p = t.tensor.ptr<float>();
    out[t.kind + "/" + t.name] = std::vector<float>(p, p + t.tensor.numel());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  const int r = world->rank();
  int failures = 0;
  try {
    if (world->size() != 4) throw std::runtime_error("run with 4 ranks");
    auto backend = make_cpu_backend();
    int64_t id = r == 0 ? ::getpid() : 0;
    world->all_reduce(Tensor::contiguous_view(&id, DType::i64, Device::cpu, {1}, "id"),
                      ReduceOp::max);
    const std::string root = "/tmp/braid_reshard_layouts_" + std::to_string(id);
    // What a rank holds (every piece it would save: its parameters, its optimizer runs) against
    // the whole state, element for element.
    auto check = [&](Run& run, const std::map<std::string, std::vector<float>>& whole,
                     const char* what) {
      for (const CheckpointPiece& p : run.opt->shard_pieces(true, true, true)) {
        const auto it = whole.find(p.kind + "/" + p.name);
        if (it == whole.end() || !p.box_offset.empty() ||
            std::memcmp(static_cast<const float*>(p.data), it->second.data() + p.start,
                        size_t(p.count) * sizeof(float)) != 0)
          ++failures, std::fprintf(stderr, "rank %d: %s: %s/%s differs\n", r, what, p.kind.c_str(),
                                   p.name.c_str());
      }
    };
    Layout ep2;
    ep2.ep = 2, ep2.dp = 4;
    auto a = make_run(*world, *backend, ep2);
    for (int step = 0; step < 2; ++step) {
      fake_grads(a->model->params(), r, step);
      a->opt->step(1e-2, a->opt->reduce_and_norm());
    }
    const std::string dir = save_checkpoint_sharded(
        root + "/a", {2, 0, 1, {}}, a->opt->shard_pieces(a->grad_rank == 0, a->edp_rank == 0, true),
        world.get());
    const auto whole = load_whole(dir, *backend);
    check(*a, whole, "ep=2 x dp=4 as saved");

    Layout ep4;
    ep4.ep = 4, ep4.dp = 4;
    auto b = make_run(*world, *backend, ep4);
    b->opt->load(dir, 2);
    check(*b, whole, "ep=4 loaded");

    Layout pp2;
    pp2.pp = 2, pp2.dp = 2;
    auto c = make_run(*world, *backend, pp2);
    c->opt->load(dir, 2);
    check(*c, whole, "pp=2 x dp=2 loaded");
    const std::string dir2 =
        save_checkpoint_sharded(root + "/c", {2, 0, 1, {}},
                                c->opt->shard_pieces(c->grad_rank == 0, true, true), world.get());
    if (load_whole(dir2, *backend) != whole)
      ++failures, std::fprintf(stderr, "rank %d: the pp=2 x dp=2 checkpoint differs\n", r);
    world->barrier();
    if (r == 0) std::filesystem::remove_all(root);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", r, e.what());
    mpi_abort(1);
  }
  return test::mpi_test_exit(
      *world, failures,
      "reshard ep=2 x dp=4 -> ep=4, -> pp=2 x dp=2, pp=2 -> one process (every tensor bit-equal)");
}
