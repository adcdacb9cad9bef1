// Host mirrors of device memory for checkpoints of a GPU run. Regions of device memory (the
// parameter values, the optimizer state) each get a page-locked host mirror of the same size,
// allocated once. A save stages its pieces: the bytes they read are copied into the mirror on a
// copy stream that first waits for the work queued on the default stream (the state after the
// optimizer step), and the pieces are pointed at the mirror. The copies run while training goes
// on: a background writer calls wait_copied() before it reads the mirror, and the run calls
// fence() before its next optimizer step, so the step waits (on the device) for the copies and a
// checkpoint never holds a later step's values. A load reads into the mirror (unstage) and
// copies the bytes it read back to the device (upload). The caller must not stage again while a
// writer still reads the mirror.
#pragma once

#include <cstddef>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "runtime/backend.h"

namespace braid {

class DeviceStaging {
 public:
  struct Region {
    const void* data = nullptr;  // device memory
    size_t bytes = 0;
  };
  DeviceStaging(Backend& backend, std::vector<Region> regions);
  ~DeviceStaging();
  DeviceStaging(const DeviceStaging&) = delete;
  DeviceStaging& operator=(const DeviceStaging&) = delete;

  // Queues the copies of what the pieces (tensors) read and points them at the mirror; a piece
  // outside every region is an error.
  void stage(std::vector<CheckpointPiece>& pieces);
  void stage(std::vector<CheckpointTensor>& tensors);
  // Blocks until the staged copies are done (any thread).
  void wait_copied();
  // The default stream waits for the staged copies (the next optimizer step runs after them).
  void fence();
  // Points the reads into the regions at the mirror (reads into other, host, memory are left as
  // they are), and after the load (upload) copies the bytes they read back to the device and
  // waits.
  void unstage(std::vector<CheckpointRead>& reads);
  void unstage(std::vector<CheckpointTensor>& tensors);  // each must lie in a region
  void upload();
  size_t host_bytes() const { return total_; }

 private:
  struct Span {
    size_t region, begin, end;  // bytes [begin, end) of a region
  };
  char* host_of(const void* device, size_t bytes, std::vector<Span>& spans);
  // Merged spans (sorted, adjacent ones joined): the copies to queue.
  static std::vector<Span> merged(std::vector<Span> spans);

  Backend& backend_;
  std::vector<Region> regions_;
  std::vector<size_t> offsets_;  // of each region's mirror in host_
  size_t total_ = 0;
  char* host_ = nullptr;
  Stream copy_stream_;
  Event copied_;
  std::vector<Span> loaded_;  // what the last unstage's reads fill
};

}  // namespace braid
