#include "checkpoint/device_staging.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace braid {

DeviceStaging::DeviceStaging(Backend& backend, std::vector<Region> regions)
    : backend_(backend), regions_(std::move(regions)) {
  for (const Region& r : regions_) {
    offsets_.push_back(total_);
    total_ += (r.bytes + 63) / 64 * 64;
  }
  host_ = static_cast<char*>(backend_.allocate_host(total_));
  copy_stream_ = backend_.create_stream();
  copied_ = backend_.create_event();
  backend_.record(copied_, copy_stream_);
}

DeviceStaging::~DeviceStaging() {
  backend_.synchronize(copy_stream_);
  backend_.destroy_event(copied_);
  backend_.destroy_stream(copy_stream_);
  backend_.release_host(host_);
}

char* DeviceStaging::host_of(const void* device, size_t bytes, std::vector<Span>& spans) {
  const char* p = static_cast<const char*>(device);
  for (size_t i = 0; i < regions_.size(); ++i) {
    const char* base = static_cast<const char*>(regions_[i].data);
    if (p >= base && p + bytes <= base + regions_[i].bytes) {
      const size_t at = size_t(p - base);
      spans.push_back({i, at, at + bytes});
      return host_ + offsets_[i] + at;
    }
  }
  return nullptr;
}

std::vector<DeviceStaging::Span> DeviceStaging::merged(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.region != b.region ? a.region < b.region : a.begin < b.begin;
  });
  std::vector<Span> out;
  for (const Span& s : spans) {
    if (!out.empty() && out.back().region == s.region && s.begin <= out.back().end)
      out.back().end = std::max(out.back().end, s.end);
    else
      out.push_back(s);
  }
  return out;
}

void DeviceStaging::stage(std::vector<CheckpointPiece>& pieces) {
  std::vector<Span> spans;
  for (CheckpointPiece& p : pieces)
    if (p.count > 0) {
      const void* host = host_of(p.data, size_t(p.count) * dtype_size(p.dtype), spans);
      BRAID_CHECK(host, "checkpoint staging: piece ", p.kind, "/", p.name,
                  " lies outside the device regions it mirrors");
      p.data = host;
    }
  const Event queued = backend_.create_event();
  backend_.record(queued, {});
  backend_.wait(copy_stream_, queued);
  for (const Span& s : merged(std::move(spans)))
    backend_.copy(host_ + offsets_[s.region] + s.begin, Device::cpu,
                  static_cast<const char*>(regions_[s.region].data) + s.begin, backend_.device(),
                  s.end - s.begin, copy_stream_);
  backend_.record(copied_, copy_stream_);
  backend_.destroy_event(queued);  // released once its pending wait has resolved
}

namespace {

// The host view at `host` of a device tensor's elements.
Tensor host_view(const Tensor& t, const void* host) {
  return Tensor::contiguous_view(const_cast<void*>(host), t.dtype, Device::cpu, t.shape.data(),
                                 t.ndim, t.name);
}

}  // namespace

void DeviceStaging::stage(std::vector<CheckpointTensor>& tensors) {
  std::vector<CheckpointPiece> pieces;
  for (const CheckpointTensor& t : tensors)
    pieces.push_back({t.kind, t.name, t.tensor.dtype, {}, 0, t.tensor.numel(), t.tensor.data});
  stage(pieces);
  for (size_t i = 0; i < tensors.size(); ++i)
    tensors[i].tensor = host_view(tensors[i].tensor, pieces[i].data);
}

// Polls and sleeps rather than spinning in cudaStreamSynchronize beside the training thread.
void DeviceStaging::wait_copied() {
  while (!backend_.finished(copied_)) std::this_thread::sleep_for(std::chrono::microseconds(500));
}

void DeviceStaging::fence() {
  backend_.wait({}, copied_);
}

void DeviceStaging::unstage(std::vector<CheckpointRead>& reads) {
  loaded_.clear();
  for (CheckpointRead& r : reads)
    if (r.count > 0 && r.dst)
      if (char* host = host_of(r.dst, size_t(r.count) * dtype_size(r.dtype), loaded_)) r.dst = host;
}

void DeviceStaging::unstage(std::vector<CheckpointTensor>& tensors) {
  loaded_.clear();
  for (CheckpointTensor& t : tensors) {
    const char* host = host_of(t.tensor.data, t.tensor.nbytes(), loaded_);
    BRAID_CHECK(host, "checkpoint staging: ", t.kind, "/", t.name,
                " lies outside the device regions it mirrors");
    t.tensor = host_view(t.tensor, host);
  }
}

void DeviceStaging::upload() {
  for (const Span& s : merged(std::move(loaded_)))
    backend_.copy(const_cast<char*>(static_cast<const char*>(regions_[s.region].data)) + s.begin,
                  backend_.device(), host_ + offsets_[s.region] + s.begin, Device::cpu,
                  s.end - s.begin, copy_stream_);
  loaded_.clear();
  backend_.synchronize(copy_stream_);
}

}  // namespace braid
