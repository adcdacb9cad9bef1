// Checkpoint save and load throughput for a model's full training state (every parameter, and the
// fp32 master weights and Adam moments), one process, on the disk under DIR:
//   sync save   write + fsync + commit (save_checkpoint), GB/s of tensor data;
//   load        load_checkpoint of that save (digests, then every tensor; the files were just
//               written, so they are read mostly from the page cache: a bound, not the disk);
//   async save  the time submit() blocks the caller (copying the state; the first save also
//               allocates the staging buffer, later ones reuse it), and the background write
//               until the commit.
// The model is built on the CPU in f32; a GPU run's state is the same f32 tensors (its bf16
// compute copies are not saved), staged through page-locked memory (checkpoint/device_staging.h).
// Usage: bench_checkpoint CONFIG DIR [--out results.json]
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "checkpoint/async_save.h"
#include "checkpoint/checkpoint.h"
#include "launch/config.h"
#include "layers/model/model.h"
#include "runtime/backend.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace braid;
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_checkpoint CONFIG DIR [--out results.json]\n");
    return 2;
  }
  const std::string config = argv[1], root = argv[2];
  std::string out;
  for (int i = 3; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  try {
    const RunConfig cfg = load_config(config, {});
    auto backend = make_cpu_backend();
    // The smallest microbatch the model plans for: only the state matters here.
    Model model(cfg.model, DType::f32, *backend, 1, cfg.model.mamba2.chunk);
    model.initialize(cfg.train.seed);
    AdamW opt(model.params(), cfg.adamw, *backend);
    const std::vector<CheckpointTensor> state = training_state(model.params(), opt);
    double bytes = 0;
    for (const CheckpointTensor& t : state)
      bytes += double(t.tensor.numel()) * double(dtype_size(t.tensor.dtype));
    std::filesystem::create_directories(root);
    const CheckpointMeta meta{1, 0, cfg.train.seed, config_entries(cfg)};

    auto t0 = std::chrono::steady_clock::now();
    const std::string dir = save_checkpoint(root, meta, state);
    const double save_s = seconds_since(t0);

    t0 = std::chrono::steady_clock::now();
    load_checkpoint(dir, state);
    const double load_s = seconds_since(t0);

    // Two asynchronous saves, each after the previous one has committed: the first allocates
    // the staging buffer, the second shows the steady state. One checkpoint is kept on disk
    // besides the one being written.
    double write_s = 0, blocked_first_s = 0, blocked_s = 0;
    AsyncCheckpointWriter writer;
    for (int64_t step : {2, 3}) {
      prune_checkpoints(root, 1);
      t0 = std::chrono::steady_clock::now();
      writer.submit(root, {step, 0, cfg.train.seed, meta.config}, state,
                    [&](const std::string&, double s) { write_s = s; });
      (step == 2 ? blocked_first_s : blocked_s) = seconds_since(t0);
      writer.wait();
    }

    const double gb = bytes / 1e9;
    std::printf("state: %zu tensors, %.2f GB (%lld parameters)\n", state.size(), gb,
                static_cast<long long>(model.params().numel()));
    std::printf("%-12s %9s %9s\n", "", "seconds", "GB/s");
    std::printf("%-12s %9.2f %9.2f\n", "sync save", save_s, gb / save_s);
    std::printf("%-12s %9.2f %9.2f\n", "load", load_s, gb / load_s);
    std::printf("%-12s %9.3f %9s\n", "async block", blocked_s, "");
    std::printf("%-12s %9.3f %9s\n", "(first save)", blocked_first_s, "");
    std::printf("%-12s %9.2f %9.2f\n", "async write", write_s, gb / write_s);
    if (!out.empty()) {
      FILE* f = std::fopen(out.c_str(), "w");
      std::fprintf(f,
                   "{\"config\": \"%s\", \"parameters\": %lld, \"state_bytes\": %.0f, "
                   "\"sync_save_s\": %.3f, \"sync_save_gb_per_s\": %.3f, \"load_s\": %.3f, "
                   "\"load_gb_per_s\": %.3f, \"async_blocked_s\": %.4f, "
                   "\"async_blocked_first_save_s\": %.4f, \"async_write_s\": %.3f}\n",
                   config.c_str(), static_cast<long long>(model.params().numel()), bytes, save_s,
                   gb / save_s, load_s, gb / load_s, blocked_s, blocked_first_s, write_s);
      std::fclose(f);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_checkpoint: %s\n", e.what());
    return 1;
  }
  return 0;
}
