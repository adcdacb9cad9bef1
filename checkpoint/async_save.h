// Checkpoints written in the background. submit() copies every tensor into a host staging buffer
// before it returns, so the caller may take the next optimizer step at once and the checkpoint
// still holds this step's values; one thread then writes and commits it (save_checkpoint) and
// calls `done`. At most one save is in flight: submit() first waits for the previous one.
// wait() joins the write in flight and rethrows its failure, if any.
#pragma once

#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint.h"

namespace braid {

class AsyncCheckpointWriter {
 public:
  using Done = std::function<void(const std::string& dir, double write_seconds)>;
  AsyncCheckpointWriter() = default;
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;
  ~AsyncCheckpointWriter();  // joins; call wait() first to see a failure

  // Returns after the copy; the seconds spent waiting for the previous save and copying are what
  // the caller was blocked.
  void submit(const std::string& root, const CheckpointMeta& meta,
              const std::vector<CheckpointTensor>& tensors, Done done);
  void wait();

 private:
  std::thread thread_;
  std::exception_ptr error_;
  std::vector<char> staging_;  // the tensors of the save in flight
};

}  // namespace braid
