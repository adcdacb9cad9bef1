// Checkpoints written in the background. submit() copies every tensor into a host staging buffer
// before it returns, so the caller may take the next optimizer step at once and the checkpoint
// still holds this step's values; one thread then writes and commits it (save_checkpoint) and
// calls `done`. At most one save is in flight: submit() first waits for the previous one.
// wait() joins the write in flight and rethrows its failure, if any.
#pragma once

#include <atomic>
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
  // The tensors are already staged in host memory that stays untouched until the write is done
  // (DeviceStaging, whose copies may still be under way): the thread first runs `ready` (which
  // waits for them), then writes. Call wait() before staging the next save into that memory.
  void submit_staged(const std::string& root, const CheckpointMeta& meta,
                     std::vector<CheckpointTensor> tensors, std::function<void()> ready, Done done);
  void wait();

 private:
  std::thread thread_;
  std::exception_ptr error_;
  std::vector<char> staging_;  // the tensors of the save in flight
};

// Sharded checkpoints written in the background (every rank of a job). submit() (collective, at
// a step boundary) waits for and commits the previous save, creates the temporary directory,
// copies this rank's pieces into a staging buffer and starts a thread that writes the rank's file;
// the caller goes on training at once. poll() (collective, once per step) commits the save when
// every rank's file is written: each rank says whether its thread is done (one all-reduce), and
// then all commit together (commit_sharded_save). finish() (collective) waits and commits. A
// failed write is rethrown by the next poll/finish on that rank, after the ranks agreed on it.
class AsyncShardedWriter {
 public:
  using Done = std::function<void(const std::string& dir)>;
  explicit AsyncShardedWriter(Communicator* world) : world_(world) {}
  AsyncShardedWriter(const AsyncShardedWriter&) = delete;
  AsyncShardedWriter& operator=(const AsyncShardedWriter&) = delete;
  ~AsyncShardedWriter();  // joins; call finish() to commit

  void submit(const std::string& root, const CheckpointMeta& meta,
              const std::vector<CheckpointPiece>& pieces, Done done);
  // As submit, for pieces already staged in host memory left untouched until the save commits
  // (DeviceStaging): the thread first runs `ready`, then writes. Call finish() before staging the
  // next save into that memory.
  void submit_staged(const std::string& root, const CheckpointMeta& meta,
                     std::vector<CheckpointPiece> pieces, std::function<void()> ready, Done done);
  void poll();
  void finish();
  bool pending() const { return pending_; }

 private:
  void commit();  // after every rank's thread has ended
  Communicator* world_;
  bool pending_ = false;
  ShardedSave save_;
  Done done_;
  std::thread thread_;
  std::atomic<bool> written_{false};
  std::string report_;
  std::exception_ptr error_;
  std::vector<char> staging_;
};

}  // namespace braid
