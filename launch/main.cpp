// The braid binary: `braid train`, `braid prep` and `braid ckpt`. Errors print one line, "braid:
// error: ...", and exit with status 2 (bad config, data or arguments) or 1 (anything unexpected);
// `braid train` also exits 3 (saved on SIGUSR1), 4 (crash loop) or 143 (SIGTERM): job_control.h.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "data/prep.h"
#include "launch/config.h"
#include "launch/job_control.h"
#include "launch/trainer.h"
#include "parallel/launch_env.h"
#include "runtime/check.h"

namespace {

const char* kUsage =
    "usage:\n"
    "  braid train --config FILE [section.key=value ...]\n"
    "  braid prep --input PATH [PATH ...] --out DIR [--ext .py ...]\n"
    "             [--tokenizer byte|tokenizer.json] [--eos-token TOKEN] [--valid-fraction F]\n"
    "  braid ckpt inspect DIR    what a checkpoint holds (its manifest)\n"
    "  braid ckpt verify DIR     check every file and dataset against its digest\n"
    "  braid ckpt convert DIR ROOT  rewrite a (sharded) checkpoint as one file under ROOT\n";

int cmd_train(const std::vector<std::string>& args) {
  std::string config;
  std::vector<std::string> overrides;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config") {
      BRAID_REQUIRE(i + 1 < args.size(), "braid train: --config needs a file");
      config = args[++i];
    } else if (args[i].find('=') != std::string::npos && args[i][0] != '-') {
      overrides.push_back(args[i]);
    } else {
      BRAID_REJECT("braid train: unexpected argument '", args[i], "' (see braid --help)");
    }
  }
  BRAID_REQUIRE(!config.empty(), "braid train: --config FILE is required (see braid --help)");
  const braid::RunConfig cfg = braid::load_config(config, overrides);
  // Launched as several ranks (mpirun, srun): data parallel over all of them, through MPI.
  std::unique_ptr<braid::MpiSession> mpi;
  std::unique_ptr<braid::Communicator> world;
  if (braid::read_launch_env().world_size > 1) {
    mpi = std::make_unique<braid::MpiSession>(nullptr, nullptr);
    world = braid::make_mpi_world(braid::comm_timeout_from_env(600));
  }
  braid::install_signal_handlers();
  braid::TrainSummary s;
  try {
    s = braid::train(cfg, world.get());
  } catch (const braid::CrashLoop& e) {  // every rank throws it: no abort needed
    if (!world || world->rank() == 0) std::fprintf(stderr, "braid: error: %s\n", e.what());
    return braid::kExitCrashLoop;
  } catch (const braid::Error& e) {
    if (!world) throw;
    std::fprintf(stderr, "braid: error: rank %d: %s\n", world->rank(), e.what());
    braid::mpi_abort(braid::kExitBadInput);
  }
  if (s.stopped_on_signal) return braid::kExitSavedForRequeue;
  if (world && world->rank() != 0) return 0;
  const double below = 100.0 * (1.0 - s.final_valid_loss / s.unigram_entropy);
  std::printf(
      "done: %lld steps in %.1f s | final train loss %.4f | held-out loss %.4f | unigram entropy "
      "%.4f "
      "nats/token | held-out loss is %.1f%% %s the unigram entropy\n",
      (long long)s.steps, s.seconds, s.final_train_loss, s.final_valid_loss, s.unigram_entropy,
      below >= 0 ? below : -below, below >= 0 ? "below" : "above");
  return 0;
}

int cmd_prep(const std::vector<std::string>& args) {
  braid::PrepOptions opt;
  for (size_t i = 0; i < args.size(); ++i) {
    auto next = [&]() -> std::string {
      BRAID_REQUIRE(i + 1 < args.size(), "braid prep: ", args[i], " needs a value");
      return args[++i];
    };
    if (args[i] == "--input")
      opt.inputs.push_back(next());
    else if (args[i] == "--out")
      opt.out_dir = next();
    else if (args[i] == "--ext")
      opt.extensions.push_back(next());
    else if (args[i] == "--tokenizer")
      opt.tokenizer = next();
    else if (args[i] == "--eos-token")
      opt.eos_token = next();
    else if (args[i] == "--valid-fraction")
      opt.valid_fraction = std::stod(next());
    else if (args[i].rfind("--", 0) != 0)
      opt.inputs.push_back(args[i]);  // more inputs (a glob)
    else
      BRAID_REJECT("braid prep: unexpected argument '", args[i], "' (see braid --help)");
  }
  const braid::PrepReport r = braid::prep_corpus(opt);
  std::printf("prep: %lld train documents (%lld tokens) -> %s\n", (long long)r.train_docs,
              (long long)r.train_tokens, r.train_path.c_str());
  std::printf("prep: %lld held-out documents (%lld tokens) -> %s\n", (long long)r.valid_docs,
              (long long)r.valid_tokens, r.valid_path.c_str());
  return 0;
}

// `braid ckpt inspect|verify DIR`: a summary of the manifest; verify first checks every file and
// dataset against its digest (an error names the file and dataset, exit 2). `braid ckpt convert
// DIR ROOT` rewrites a checkpoint, sharded or not, as one file under ROOT.
int cmd_ckpt(const std::vector<std::string>& args) {
  if (args.size() == 3 && args[0] == "convert") {
    const std::string out = braid::convert_checkpoint(args[1], args[2]);
    std::printf("converted %s -> %s (one file)\n", args[1].c_str(), out.c_str());
    return 0;
  }
  BRAID_REQUIRE(args.size() == 2 && (args[0] == "inspect" || args[0] == "verify"),
                "usage: braid ckpt inspect|verify DIR, or braid ckpt convert DIR ROOT");
  const std::string& dir = args[1];
  const braid::CheckpointSummary s =
      args[0] == "verify" ? braid::verify_checkpoint(dir) : braid::inspect_checkpoint(dir);
  std::printf("checkpoint %s\n  step %lld | consumed samples %lld | seed %llu | %zu config keys\n",
              dir.c_str(), (long long)s.meta.step, (long long)s.meta.consumed_samples,
              (unsigned long long)s.meta.seed, s.meta.config.size());
  for (const auto& [kind, n] : s.tensors)
    std::printf("  %-10s %5lld tensors, %lld elements\n", kind.c_str(), (long long)n,
                (long long)s.elements.at(kind));
  std::string files;
  for (const std::string& f : s.files) files += " " + f;
  std::printf("  tensor data %.1f MiB in%s\n", double(s.bytes) / (1 << 20), files.c_str());
  if (args[0] == "verify") std::printf("verified: every file and dataset matches its digest\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (cmd == "train") return cmd_train(args);
    if (cmd == "prep") return cmd_prep(args);
    if (cmd == "ckpt") return cmd_ckpt(args);
    std::fprintf(stderr, "braid: error: unknown command '%s'\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const braid::Error& e) {
    std::fprintf(stderr, "braid: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "braid: error: unexpected failure: %s\n", e.what());
    return 1;
  }
}
