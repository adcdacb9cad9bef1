#include "launch/job_control.h"

#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace braid {
namespace {

volatile std::sig_atomic_t g_stop_requested = 0;

void on_usr1(int) {
  g_stop_requested = 1;
}

void on_term(int) {
  // Only async-signal-safe calls here.
  static const char kMsg[] = "braid: SIGTERM: exiting now (status 143)\n";
  ssize_t ignored = write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
  (void)ignored;
  _exit(kExitTerminated);
}

std::filesystem::path attempts_path(const std::string& ckpt_dir) {
  return std::filesystem::path(ckpt_dir) / "attempts.json";
}

}  // namespace

void install_signal_handlers() {
  struct sigaction usr1 {};
  usr1.sa_handler = on_usr1;
  sigemptyset(&usr1.sa_mask);
  usr1.sa_flags = SA_RESTART;
  BRAID_CHECK(sigaction(SIGUSR1, &usr1, nullptr) == 0, "sigaction(SIGUSR1) failed");
  struct sigaction term {};
  term.sa_handler = on_term;
  sigemptyset(&term.sa_mask);
  BRAID_CHECK(sigaction(SIGTERM, &term, nullptr) == 0, "sigaction(SIGTERM) failed");
}

bool stop_requested(Communicator* world) {
  int32_t flag = g_stop_requested ? 1 : 0;
  if (world && world->size() > 1)
    world->all_reduce(Tensor::contiguous_view(&flag, DType::i32, Device::cpu, {1}, "stop"),
                      ReduceOp::max);
  return flag != 0;
}

void begin_attempt(const std::string& ckpt_dir, int64_t latest_step, int64_t max_attempts) {
  const std::filesystem::path path = attempts_path(ckpt_dir);
  int64_t attempts = 0;
  if (std::filesystem::exists(path)) {
    std::ifstream in(path);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    BRAID_REQUIRE(!j.is_discarded() && j.contains("step") && j.contains("attempts"), path.string(),
                  ": not a valid attempts record; delete it to start again");
    if (j["step"].get<int64_t>() == latest_step) attempts = j["attempts"].get<int64_t>();
  }
  if (attempts >= max_attempts)
    throw CrashLoop(
        "crash loop: " + std::to_string(attempts) + " runs in a row started from step " +
        std::to_string(latest_step) + " without committing a newer checkpoint (" + path.string() +
        "; checkpoint.max_attempts = " + std::to_string(max_attempts) + "); not starting again");
  std::filesystem::create_directories(path.parent_path());
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << nlohmann::json{{"step", latest_step}, {"attempts", attempts + 1}}.dump() << "\n";
    BRAID_REQUIRE(out.good(), "cannot write ", tmp.string());
  }
  std::filesystem::rename(tmp, path);
}

void end_attempt(const std::string& ckpt_dir) {
  std::error_code ec;
  std::filesystem::remove(attempts_path(ckpt_dir), ec);
}

}  // namespace braid
