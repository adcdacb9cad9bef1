// The NCCL backend of Communicator: GPU tensors of the current device, one rank per GPU. Each call
// is enqueued on the communicator's stream after the work already queued on the default stream
// (where Braid's kernels run: a call sees the tensors they wrote) and waited for, so it has the
// MPI backend's semantics (the data is in place when the call returns); the point-to-point
// isend and irecv, and the device-ordered calls (*_ordered), are the exceptions (see there). The
// wait is the watchdog: it polls the stream and NCCL's asynchronous error state, and a call that
// has not finished within the timeout aborts the NCCL communicator and ends the job with the rank,
// the group and the operation named.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/check.h"
#include "runtime/cuda_check.h"

#define NCCL_CHECK(call)                                                                          \
  do {                                                                                            \
    const ncclResult_t braid_nccl_rc_ = (call);                                                   \
    if (braid_nccl_rc_ != ncclSuccess)                                                            \
      ::braid::detail::fail(__FILE__, __LINE__, #call, ": ", ncclGetErrorString(braid_nccl_rc_)); \
  } while (0)

namespace braid {
namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::bf16:
      return ncclBfloat16;
    case DType::f16:
      return ncclFloat16;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
    case DType::u8:
      return ncclUint8;
  }
  return ncclUint8;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, std::string name, double timeout_s, int world_rank)
      : comm_(comm), name_(std::move(name)), timeout_s_(timeout_s), world_rank_(world_rank) {
    NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    NCCL_CHECK(ncclCommCount(comm_, &size_));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&queued_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreate(&began_));
    CUDA_CHECK(cudaEventCreate(&ended_));
    CUDA_CHECK(cudaMalloc(&scratch_, sizeof(float)));
  }
  ~NcclCommunicator() override {
    cudaStreamSynchronize(stream_);
    for (const std::vector<Timing>* v : {&timings_, &spare_})
      for (const Timing& t : *v) cudaEventDestroy(t.began), cudaEventDestroy(t.ended);
    cudaFree(scratch_);
    cudaEventDestroy(queued_);
    cudaEventDestroy(began_);
    cudaEventDestroy(ended_);
    cudaStreamDestroy(stream_);
    ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  double call_seconds() const override {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    add_ordered_times();
    return seconds_;
  }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    check(t, "all_reduce");
    timed("all_reduce", [&] {
      NCCL_CHECK(ncclAllReduce(t.data, t.data, t.numel(), nccl_type(t.dtype), nccl_op(op), comm_,
                               stream_));
    });
  }
  // Waited for by waiting for the stream (its calls finish in order).
  struct Queued : PendingTransfer {
    NcclCommunicator& c;
    bool done = false;
    explicit Queued(NcclCommunicator& comm) : c(comm) {}
    ~Queued() override { wait(); }
    void wait() override {
      if (!std::exchange(done, true)) c.wait("iall_reduce");
    }
  };
  std::unique_ptr<PendingTransfer> iall_reduce(const Tensor& t, ReduceOp op) override {
    check(t, "iall_reduce");
    after_queued();
    NCCL_CHECK(
        ncclAllReduce(t.data, t.data, t.numel(), nccl_type(t.dtype), nccl_op(op), comm_, stream_));
    return std::make_unique<Queued>(*this);
  }
  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override {
    check_scatter(in, out);
    timed("reduce_scatter", [&] {
      NCCL_CHECK(ncclReduceScatter(in.data, out.data, out.numel(), nccl_type(in.dtype), nccl_op(op),
                                   comm_, stream_));
    });
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    check_gather(in, out);
    timed("all_gather", [&] {
      NCCL_CHECK(ncclAllGather(in.data, out.data, in.numel(), nccl_type(in.dtype), comm_, stream_));
    });
  }
  void all_gather_ordered(const Tensor& in, const Tensor& out) override {
    check_gather(in, out);
    ordered([&] {
      NCCL_CHECK(ncclAllGather(in.data, out.data, in.numel(), nccl_type(in.dtype), comm_, stream_));
    });
  }
  void reduce_scatter_ordered(const Tensor& in, const Tensor& out, ReduceOp op) override {
    check_scatter(in, out);
    ordered([&] {
      NCCL_CHECK(ncclReduceScatter(in.data, out.data, out.numel(), nccl_type(in.dtype), nccl_op(op),
                                   comm_, stream_));
    });
  }
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_counts, const Tensor& out,
                    const std::vector<int64_t>& recv_counts) override {
    check(in, "all_to_all_v");
    check(out, "all_to_all_v");
    BRAID_CHECK(int(send_counts.size()) == size_ && int(recv_counts.size()) == size_,
                "all_to_all_v: one count per peer expected (", size_, ")");
    BRAID_CHECK(in.dtype == out.dtype, "all_to_all_v: dtype mismatch");
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      BRAID_CHECK(send_counts[p] >= 0 && recv_counts[p] >= 0, "all_to_all_v: negative count");
      so += send_counts[p], ro += recv_counts[p];
    }
    BRAID_CHECK(so <= in.numel() && ro <= out.numel(), "all_to_all_v: counts (", so, " sent, ", ro,
                " received) exceed ", in.describe(), " / ", out.describe());
    const size_t es = dtype_size(in.dtype);
    timed("all_to_all_v", [&] {
      NCCL_CHECK(ncclGroupStart());
      int64_t sent = 0, received = 0;
      for (int p = 0; p < size_; ++p) {
        if (send_counts[p] > 0)
          NCCL_CHECK(ncclSend(static_cast<const char*>(in.data) + sent * es, send_counts[p],
                              nccl_type(in.dtype), p, comm_, stream_));
        if (recv_counts[p] > 0)
          NCCL_CHECK(ncclRecv(static_cast<char*>(out.data) + received * es, recv_counts[p],
                              nccl_type(out.dtype), p, comm_, stream_));
        sent += send_counts[p], received += recv_counts[p];
      }
      NCCL_CHECK(ncclGroupEnd());
    });
  }
  void send(const Tensor& t, int peer) override {
    check(t, "send");
    timed("send", [&] {
      NCCL_CHECK(ncclSend(t.data, t.numel(), nccl_type(t.dtype), peer, comm_, stream_));
    });
  }
  void recv(const Tensor& t, int peer) override {
    check(t, "recv");
    timed("recv", [&] {
      NCCL_CHECK(ncclRecv(t.data, t.numel(), nccl_type(t.dtype), peer, comm_, stream_));
    });
  }
  // Point-to-point transfers. NCCL has no tags: it matches a pair's sends and receives in the
  // order they are issued, so both ends must post a pair's messages in the same order (the
  // pipeline executor checks its table for that). And two ranks that each send to the other
  // before receiving wait for each other unless the sends and receives sit in one NCCL group. So a
  // receive is held back until the next send, or until it is waited for, and issued in one group
  // with it (Megatron-LM's send-forward-receive-backward pairing: the executor posts an action's
  // receive before the previous action's send). A group runs on the communicator's stream after
  // the work queued on the default stream so far (a send reads finished data; a receive does not
  // overwrite a buffer still being read). wait() makes the default stream wait for the transfer
  // without blocking the host; a transfer that never completes holds up the next blocking call,
  // whose watchdog ends the job. These transfers are not in call_seconds().
  std::unique_ptr<PendingTransfer> isend(const Tensor& t, int peer, int tag) override {
    post(t, peer, tag, true, "isend");
    auto transfer = std::make_unique<Transfer>(*this, open_);
    flush();
    return transfer;
  }
  std::unique_ptr<PendingTransfer> irecv(const Tensor& t, int peer, int tag) override {
    post(t, peer, tag, false, "irecv");
    return std::make_unique<Transfer>(*this, open_);
  }
  void barrier() override {
    after_queued();
    NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
    wait("barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    ncclComm_t sub = nullptr;
    NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, nullptr));
    BRAID_CHECK(sub != nullptr, "split of group '", name_, "' gave no communicator");
    return std::make_unique<NcclCommunicator>(sub, name, timeout_s_, world_rank_);
  }

 private:
  // The transfers posted since the last group was issued, and the group they will form (its
  // event, recorded on the stream after the group, is what waiting transfers wait for).
  struct Group {
    cudaEvent_t done = nullptr;
    bool issued = false;
    Group() { CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming)); }
    ~Group() { cudaEventDestroy(done); }
  };
  struct Op {
    Tensor t;
    int peer;
    bool send;
  };
  struct Transfer : PendingTransfer {
    NcclCommunicator& c;
    std::shared_ptr<Group> group;
    bool done = false;
    Transfer(NcclCommunicator& comm, std::shared_ptr<Group> g) : c(comm), group(std::move(g)) {}
    ~Transfer() override { wait(); }
    void wait() override {
      if (std::exchange(done, true)) return;
      if (!group->issued) c.flush();
      CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, group->done, 0));
    }
  };
  void post(const Tensor& t, int peer, int tag, bool send, const char* op) {
    check(t, op);
    BRAID_CHECK(peer >= 0 && peer < size_ && peer != rank_, op, " on group '", name_, "': peer ",
                peer, " is not another rank of the ", size_, "-rank group");
    BRAID_CHECK(tag >= 0 && tag <= 32767, op, " on group '", name_, "': tag ", tag,
                " outside [0, 32767]");
    if (!open_) open_ = std::make_shared<Group>();
    pending_.push_back({t, peer, send});
  }
  // Issues the pending transfers as one NCCL group.
  void flush() {
    if (pending_.empty()) return;
    after_queued();
    NCCL_CHECK(ncclGroupStart());
    for (const Op& o : pending_) {
      if (o.send)
        NCCL_CHECK(ncclSend(o.t.data, o.t.numel(), nccl_type(o.t.dtype), o.peer, comm_, stream_));
      else
        NCCL_CHECK(ncclRecv(o.t.data, o.t.numel(), nccl_type(o.t.dtype), o.peer, comm_, stream_));
    }
    NCCL_CHECK(ncclGroupEnd());
    CUDA_CHECK(cudaEventRecord(open_->done, stream_));
    open_->issued = true;
    open_.reset();
    pending_.clear();
  }
  static ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : ncclMax; }
  // A blocking call: queued after the default stream's work, timed between events on the
  // communicator's stream, and waited for.
  template <class F>
  void timed(const char* op, F enqueue) {
    after_queued();
    CUDA_CHECK(cudaEventRecord(began_, stream_));
    enqueue();
    CUDA_CHECK(cudaEventRecord(ended_, stream_));
    wait(op);
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, began_, ended_));
    seconds_ += 1e-3 * ms;
    add_ordered_times();  // the stream's earlier calls are done too
  }
  // A device-ordered call: queued after the default stream's work, which then waits for it; its
  // transfer is timed between events read later (add_ordered_times).
  template <class F>
  void ordered(F enqueue) {
    after_queued();
    if (spare_.empty()) {
      Timing t;
      CUDA_CHECK(cudaEventCreate(&t.began));
      CUDA_CHECK(cudaEventCreate(&t.ended));
      spare_.push_back(t);
    }
    const Timing t = spare_.back();
    spare_.pop_back();
    CUDA_CHECK(cudaEventRecord(t.began, stream_));
    enqueue();
    CUDA_CHECK(cudaEventRecord(t.ended, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, t.ended, 0));
    timings_.push_back(t);
  }
  // Adds the device-ordered calls' times (their stream has finished them).
  void add_ordered_times() const {
    for (const Timing& t : timings_) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, t.began, t.ended));
      seconds_ += 1e-3 * ms;
      spare_.push_back(t);
    }
    timings_.clear();
  }
  void check_gather(const Tensor& in, const Tensor& out) const {
    check(in, "all_gather");
    check(out, "all_gather");
    BRAID_CHECK(in.dtype == out.dtype && out.numel() == in.numel() * size_,
                "all_gather: ", out.describe(), " must hold ", size_, " x ", in.describe());
  }
  void check_scatter(const Tensor& in, const Tensor& out) const {
    check(in, "reduce_scatter");
    check(out, "reduce_scatter");
    BRAID_CHECK(in.dtype == out.dtype && in.numel() == out.numel() * size_,
                "reduce_scatter: ", in.describe(), " must hold ", size_, " x ", out.describe());
  }
  // The communicator's stream waits for what the default stream has queued so far.
  void after_queued() {
    CUDA_CHECK(cudaEventRecord(queued_, cudaStreamLegacy));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, queued_, 0));
  }
  void check(const Tensor& t, const char* op) const {
    BRAID_CHECK(t.device == Device::cuda && t.is_contiguous(), op, " on group '", name_,
                "': ", t.describe(),
                " must be a contiguous GPU tensor (the NCCL backend moves GPU tensors)");
  }
  // Waits for the call on the stream; past the timeout, or on an NCCL error, ends the job.
  void wait(const char* op) {
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 0;; ++spins) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      BRAID_CHECK(q == cudaErrorNotReady, op, " on group '", name_, "': ", cudaGetErrorString(q));
      ncclResult_t async = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (async != ncclSuccess || waited > timeout_s_) {
        std::fprintf(stderr,
                     "braid: error: rank %d, group '%s' (rank %d of %d): NCCL %s %s; aborting\n",
                     world_rank_, name_.c_str(), rank_, size_, op,
                     async != ncclSuccess ? ncclGetErrorString(async)
                                          : "did not finish within the timeout (a rank is stuck "
                                            "or gone)");
        std::fflush(stderr);
        ncclCommAbort(comm_);
        mpi_abort(3);
      }
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  ncclComm_t comm_;
  std::string name_;
  double timeout_s_;
  int world_rank_;
  int rank_ = 0, size_ = 1;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t queued_ = nullptr;  // recorded on the default stream before each call
  cudaEvent_t began_ = nullptr, ended_ = nullptr;  // around a blocking call's transfer
  mutable double seconds_ = 0;                     // call_seconds()
  struct Timing {
    cudaEvent_t began, ended;
  };
  mutable std::vector<Timing> timings_, spare_;  // device-ordered calls not yet added; reusable
  void* scratch_ = nullptr;                      // barrier's one float
  std::vector<Op> pending_;                      // posted point-to-point transfers not yet issued
  std::shared_ptr<Group> open_;                  // the group they will form
};

}  // namespace

std::unique_ptr<Communicator> make_nccl(Communicator& bootstrap, const std::string& name,
                                        double timeout_s) {
  // Rank 0's unique id reaches every rank through the bootstrap group (a max over zeros).
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  bootstrap.all_reduce(
      Tensor::contiguous_view(&id, DType::u8, Device::cpu, {int64_t(sizeof(id))}, "nccl_id"),
      ReduceOp::max);
  ncclComm_t comm = nullptr;
  NCCL_CHECK(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()));
  return std::make_unique<NcclCommunicator>(comm, name, timeout_s, bootstrap.rank());
}

}  // namespace braid
