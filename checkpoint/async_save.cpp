#include "checkpoint/async_save.h"

#include <chrono>
#include <cstring>
#include <utility>

namespace braid {

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
  thread_ = std::thread([this, root, meta, staged = std::move(staged), done = std::move(done)] {
    try {
      const auto t0 = std::chrono::steady_clock::now();
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
  save_ = begin_sharded_save(root, meta, world_);
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
  done_ = std::move(done);
  pending_ = true, written_ = false, error_ = nullptr;
  thread_ = std::thread([this, staged = std::move(staged)] {
    try {
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
