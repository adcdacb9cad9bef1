// Resharding (under mpirun with P ranks): ZeRO-1 over all P ranks takes two optimizer steps,
// every rank writes its shard of a sharded checkpoint, and then for every Q in 1..P the first Q
// ranks load it into ZeRO-1 over Q ranks (a different flat padding and partition), each reading
// only its runs of the masters and moments, and gather the full state; one process also loads
// it with plain AdamW. Every parameter, master weight and
// Adam moment must equal the state that was saved, bit for bit (loading copies, it computes
// nothing). Also checked: the manifest names P files, one per rank.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "layers/model/model.h"
#include "optim/zero1_adamw.h"
#include "parallel/communicator.h"
#include "parallel/launch_env.h"
#include "tests/checkpoint/reshard_util.h"
#include "tests/mpi_test_util.h"

namespace {

using namespace braid;

ModelConfig config() {
  return test::reshard_config(false);
}

using test::fake_grads;

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  const int p = world->size(), r = world->rank();
  int failures = 0;
  try {
    auto backend = make_cpu_backend();
    // The shared checkpoint root, named by rank 0's process id.
    int64_t id = r == 0 ? ::getpid() : 0;
    world->all_reduce(Tensor::contiguous_view(&id, DType::i64, Device::cpu, {1}, "id"),
                      ReduceOp::max);
    const std::string root = "/tmp/braid_reshard_" + std::to_string(id);
    Model model(config(), DType::f32, *backend, 1, 8, p);
    model.initialize(3);
    AdamWConfig acfg;
    Zero1AdamW zero(model.params(), acfg, *backend, *world);
    for (int step = 0; step < 2; ++step) {
      fake_grads(model.params(), r, step);
      zero.reduce_gradients();
      zero.step(1e-2, zero.grad_norm());
    }
    std::vector<float> master, m, v;
    zero.gather_state(master, m, v);  // the saved state, laid out by this model's flat offsets
    const std::string dir = save_checkpoint_sharded(
        root, {2, 0, 1, {}}, zero1_pieces(model.params(), zero, r == 0), world.get());
    const CheckpointSummary sum = verify_checkpoint(dir);
    if (static_cast<int>(sum.files.size()) != p)
      ++failures, std::fprintf(stderr, "rank %d: %zu files, expected %d\n", r, sum.files.size(), p);
    // The logical value of kind/name in a state laid out by `params`' flat offsets.
    auto same = [&](const ParamSet& mine, const std::vector<float>& mine_vec,
                    const std::vector<float>& ref_vec, const char* kind, int q) {
      for (const Param& x : mine.all()) {
        if (!x.trainable) continue;
        const Param* y = nullptr;
        for (const Param& z : model.params().all())
          if (z.name == x.name) y = &z;
        if (std::memcmp(mine_vec.data() + mine.flat_offset(x),
                        ref_vec.data() + model.params().flat_offset(*y),
                        x.value.numel() * sizeof(float)) != 0) {
          ++failures;
          std::fprintf(stderr, "rank %d: Q=%d: %s/%s differs\n", r, q, kind, x.name.c_str());
        }
      }
    };
    for (int q = 1; q <= p; ++q) {
      auto sub = world->split(r < q ? 0 : 1, r, "reshard");
      if (r < q) {
        Model other(config(), DType::f32, *backend, 1, 8, q);
        other.initialize(99);  // different values before the load
        Zero1AdamW z(other.params(), acfg, *backend, *sub);
        std::vector<float> sm, s1, s2;  // this rank's shards, read as hyperslabs
        load_checkpoint_ranges(dir, zero1_reads(other.params(), z, sm, s1, s2));
        z.load_shard(sm, s1, s2, 2);
        std::vector<float> gm, g1, g2;
        z.gather_state(gm, g1, g2);
        same(other.params(), gm, master, "master", q);
        same(other.params(), g1, m, "exp_avg", q);
        same(other.params(), g2, v, "exp_avg_sq", q);
        for (size_t i = 0; i < other.params().all().size(); ++i) {
          const Tensor &a = other.params().all()[i].value, &b = model.params().all()[i].value;
          if (std::memcmp(a.data, b.data, a.nbytes()) != 0)
            ++failures, std::fprintf(stderr, "rank %d: Q=%d: param %zu differs\n", r, q, i);
        }
      }
      world->barrier();
    }
    if (r == 0) {  // one process, plain AdamW
      Model single(config(), DType::f32, *backend, 1, 8);
      single.initialize(5);
      AdamW adam(single.params(), acfg, *backend);
      load_checkpoint(dir, single.params(), adam);
      for (const AdamW::State& s : adam.state()) {
        const Param* y = nullptr;
        for (const Param& z : model.params().all())
          if (z.name == s.param->name) y = &z;
        const int64_t off = model.params().flat_offset(*y);
        for (auto [t, ref] :
             {std::pair{&s.master, &master}, std::pair{&s.m, &m}, std::pair{&s.v, &v}})
          if (std::memcmp(t->data, ref->data() + off, t->nbytes()) != 0)
            ++failures, std::fprintf(stderr, "single process: %s differs\n", y->name.c_str());
      }
      std::filesystem::remove_all(root);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", r, e.what());
    mpi_abort(1);
  }
  return test::mpi_test_exit(
      *world, failures,
      "reshard: a sharded checkpoint reloaded on 1..P ranks and by one process (bit-equal)");
}
