// Job control for long runs under SLURM or mpirun: signals, agreement at step boundaries, the
// exit statuses job scripts act on, and the crash-loop guard.
//
// Exit statuses of `braid train`:
//   0   done (train.steps reached)
//   1   unexpected failure: requeue, it resumes from the newest checkpoint
//   2   bad input (configuration, data, checkpoint): do not requeue, fix the input
//   3   stopped on SIGUSR1 after saving a checkpoint at a step boundary: requeue
//   4   crash loop: checkpoint.max_attempts runs in a row started from the same checkpoint and
//       none committed a newer one: do not requeue
//   143 SIGTERM: exited at once (a checkpoint being written stays an uncommitted .tmp directory,
//       never loaded; the previous one stays intact)
#pragma once

#include <cstdint>
#include <string>

#include "parallel/communicator.h"

namespace braid {

constexpr int kExitDone = 0, kExitFailed = 1, kExitBadInput = 2, kExitSavedForRequeue = 3,
              kExitCrashLoop = 4, kExitTerminated = 143;

// SIGUSR1 sets a flag read by stop_requested; SIGTERM exits with status 143 at once.
void install_signal_handlers();

// Whether any rank has received SIGUSR1. Collective: every rank of world calls it at the same
// step boundary (one small all-reduce); world null or of one rank: this process alone.
bool stop_requested(Communicator* world);

// The crash-loop guard, kept in <checkpoint dir>/attempts.json: {"step": S, "attempts": k}, the
// newest committed step when a run started and how many runs in a row started from it without
// ending cleanly. begin_attempt (rank 0, at start-up) counts this run and fails with exit status
// 4's message when the count would pass max_attempts; end_attempt (on a clean end: done or
// saved on a signal) removes the record.
struct CrashLoop : Error {
  using Error::Error;
};
void begin_attempt(const std::string& ckpt_dir, int64_t latest_step, int64_t max_attempts);
void end_attempt(const std::string& ckpt_dir);

}  // namespace braid
