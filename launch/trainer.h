// The training loop of `braid train` on one process: builds the model, optimizer and data from a
// RunConfig, runs steps of grad_accum microbatches, logs a progress line and a JSONL record per
// step, evaluates held-out loss every eval_interval steps and at the end, saves checkpoints every
// checkpoint.interval steps and at the end, and resumes exactly from the newest one when asked.
// SIGUSR1 on any rank stops every rank at the next step boundary after a save (job_control.h).
#pragma once

#include "launch/config.h"
#include "parallel/communicator.h"

namespace braid {

struct TrainSummary {
  double final_train_loss = 0;  // mean over the last log interval (nats per token)
  double final_valid_loss = 0;
  double unigram_entropy = 0;  // of the training tokens (nats per token)
  int64_t steps = 0;           // steps run by this invocation
  double seconds = 0;
  bool stopped_on_signal = false;  // SIGUSR1: saved at a step boundary before train.steps
};

// world: the ranks of a data-parallel run (null or one rank: a single process). Every rank of a
// data-parallel run reads the same config; rank 0 prints, logs and writes checkpoints.
TrainSummary train(const RunConfig& cfg, Communicator* world);

}  // namespace braid
