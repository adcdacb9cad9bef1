#include "checkpoint/async_save.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <utility>

namespace braid {
namespace {

// The writing thread (and the threads it starts to hash pieces, which inherit it) runs at the
// lowest priority: the hashing may take every core, and the training thread must keep one to
// launch its kernels.
void lower_priority() {
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
}

}  // namespace

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  if (thread_.joinable()) thread_.join();
}

void AsyncCheckpointWriter::wait() {
  if (thread_.joinable()) thread_.join();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void AsyncCheckpointWriter::submit(const std::string& root, const CheckpointMeta& meta,
                                   const std::vector<CheckpointTensor>& tensors, Done done) {
  wait();
  for (const CheckpointTensor& t : tensors)
    BRAID_CHECK(t.tensor.device == Device::cpu && t.tensor.is_contiguous(),
                "async checkpoint: ", t.tensor.describe(), " must be a contiguous host tensor");
  std::vector<CheckpointTensor> staged = host_layout(tensors, staging_);
  // The copy is all the caller waits for: every core takes part.
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < tensors.size(); ++i)
    std::memcpy(staged[i].tensor.data, tensors[i].tensor.data, tensors[i].tensor.nbytes());
  submit_staged(root, meta, std::move(staged), nullptr, std::move(done));
}

void AsyncCheckpointWriter::submit_staged(const std::string& root, const CheckpointMeta& meta,
                                          std::vector<CheckpointTensor> staged,
                                          std::function<void()> ready, Done done) {
  wait();
  thread_ = std::thread([this, root, meta, staged = std::move(staged), ready = std::move(ready),
                         done = std::move(done)] {
    lower_priority();
    try {
      const auto t0 = std::chrono::steady_clock::now();
      if (ready) ready();
      const std::string dir = save_checkpoint(root, meta, staged);
      done(dir, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

AsyncShardedWriter::~AsyncShardedWriter() {
  if (thread_.joinable()) thread_.join();
}

void AsyncShardedWriter::submit(const std::string& root, const CheckpointMeta& meta,
                                const std::vector<CheckpointPiece>& pieces, Done done) {
  finish();  // at most one save in flight
  // Stage this rank's pieces (the caller's next optimizer step may change the originals).
  size_t total = 0;
  std::vector<size_t> offsets;
  for (const CheckpointPiece& p : pieces) {
    offsets.push_back(total);
    total += (p.count * dtype_size(p.dtype) + 63) / 64 * 64;
  }
  staging_.resize(total);
  std::vector<CheckpointPiece> staged = pieces;
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < pieces.size(); ++i) {
    std::memcpy(staging_.data() + offsets[i], pieces[i].data,
                pieces[i].count * dtype_size(pieces[i].dtype));
    staged[i].data = staging_.data() + offsets[i];
  }
  submit_staged(root, meta, std::move(staged), nullptr, std::move(done));
}

void AsyncShardedWriter::submit_staged(const std::string& root, const CheckpointMeta& meta,
                                       std::vector<CheckpointPiece> staged,
                                       std::function<void()> ready, Done done) {
  finish();
  save_ = begin_sharded_save(root, meta, world_);
  done_ = std::move(done);
  pending_ = true, written_ = false, error_ = nullptr;
  thread_ = std::thread([this, staged = std::move(staged), ready = std::move(ready)] {
    lower_priority();
    try {
      if (ready) ready();
      report_ = write_rank_file(save_, staged);
    } catch (...) {
      error_ = std::current_exception();
    }
    written_ = true;
  });
}

void AsyncShardedWriter::poll() {
  if (!pending_) return;
  int32_t done = written_ ? 1 : 0;
  if (world_ && world_->size() > 1)
    world_->all_reduce(Tensor::contiguous_view(&done, DType::i32, Device::cpu, {1}, "written"),
                       ReduceOp::sum);
  if (done == (world_ ? world_->size() : 1)) commit();
}

void AsyncShardedWriter::finish() {
  if (!pending_) return;
  thread_.join();
  written_ = true;
  poll();  // every rank has joined: all are written
}

void AsyncShardedWriter::commit() {
  if (thread_.joinable()) thread_.join();
  pending_ = false;
  // A rank whose write failed makes every rank fail (no commit of a partial checkpoint).
  int32_t failed = error_ ? 1 : 0;
  if (world_ && world_->size() > 1)
    world_->all_reduce(Tensor::contiguous_view(&failed, DType::i32, Device::cpu, {1}, "failed"),
                       ReduceOp::max);
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  BRAID_REQUIRE(!failed, "checkpoint of step ", save_.meta.step,
                ": another rank failed to write its file (see its error); not committed");
  const std::string dir = commit_sharded_save(save_, report_, world_);
  if (done_) done_(dir);
}

}  // namespace braid
