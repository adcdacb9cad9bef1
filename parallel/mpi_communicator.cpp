// The MPI backend of Communicator, with a watchdog thread per communicator.
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "parallel/communicator.h"
#include "runtime/check.h"

#define MPI_CHECK(call)                                                       \
  do {                                                                        \
    const int braid_mpi_rc_ = (call);                                         \
    if (braid_mpi_rc_ != MPI_SUCCESS) {                                       \
      char braid_mpi_msg_[MPI_MAX_ERROR_STRING];                              \
      int braid_mpi_len_ = 0;                                                 \
      MPI_Error_string(braid_mpi_rc_, braid_mpi_msg_, &braid_mpi_len_);       \
      ::braid::detail::fail(__FILE__, __LINE__, #call, ": ", braid_mpi_msg_); \
    }                                                                         \
  } while (0)

namespace braid {
namespace {

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    case DType::u8:
      return MPI_UINT8_T;
    case DType::bf16:
    case DType::f16:
      return MPI_UINT16_T;  // moved as bits; not reducible
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  return op == ReduceOp::sum ? MPI_SUM : MPI_MAX;
}

// Watches one communicator: each call sets the operation and its start time; a thread ends the
// job when a call runs past the timeout.
class Watchdog {
 public:
  Watchdog(std::string what, double timeout_s) : what_(std::move(what)), timeout_s_(timeout_s) {
    thread_ = std::thread([this] { run(); });
  }
  ~Watchdog() {
    stop_ = true;
    thread_.join();
  }
  void begin(const char* op) {
    op_.store(op);
    start_ns_.store(now_ns());
  }
  void end() { op_.store(nullptr); }

 private:
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void run() {
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const char* op = op_.load();
      if (op && double(now_ns() - start_ns_.load()) * 1e-9 > timeout_s_) {
        std::fprintf(stderr,
                     "braid: error: %s: %s did not finish within %.0f s (a rank is stuck or gone); "
                     "aborting\n",
                     what_.c_str(), op, timeout_s_);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 3);
      }
    }
  }
  std::string what_;
  double timeout_s_;
  std::atomic<const char*> op_{nullptr};
  std::atomic<int64_t> start_ns_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_s, bool owned)
      : comm_(comm), name_(std::move(name)), timeout_s_(timeout_s), owned_(owned) {
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
    int world_rank = 0;
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank));
    watchdog_ = std::make_unique<Watchdog>("rank " + std::to_string(world_rank) + ", group '" +
                                               name_ + "' (rank " + std::to_string(rank_) + " of " +
                                               std::to_string(size_) + ")",
                                           timeout_s);
  }
  ~MpiCommunicator() override {
    watchdog_.reset();
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  double call_seconds() const override { return seconds_; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    check(t, "all_reduce", true);
    Scope s(*this, "all_reduce");
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.data, count(t), mpi_type(t.dtype), mpi_op(op), comm_));
  }
  std::unique_ptr<PendingTransfer> iall_reduce(const Tensor& t, ReduceOp op) override {
    check(t, "iall_reduce", true);
    auto p = std::make_unique<Pending>(*this, "iall_reduce");
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, t.data, count(t), mpi_type(t.dtype), mpi_op(op), comm_,
                             &p->request));
    return p;
  }
  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) override {
    check(in, "reduce_scatter", true);
    check(out, "reduce_scatter", true);
    BRAID_CHECK(in.dtype == out.dtype && in.numel() == out.numel() * size_,
                "reduce_scatter: ", in.describe(), " must hold ", size_, " x ", out.describe());
    Scope s(*this, "reduce_scatter");
    MPI_CHECK(MPI_Reduce_scatter_block(in.data, out.data, count(out), mpi_type(in.dtype),
                                       mpi_op(op), comm_));
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    check(in, "all_gather", false);
    check(out, "all_gather", false);
    BRAID_CHECK(in.dtype == out.dtype && out.numel() == in.numel() * size_,
                "all_gather: ", out.describe(), " must hold ", size_, " x ", in.describe());
    Scope s(*this, "all_gather");
    MPI_CHECK(MPI_Allgather(in.data, count(in), mpi_type(in.dtype), out.data, count(in),
                            mpi_type(in.dtype), comm_));
  }
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_counts, const Tensor& out,
                    const std::vector<int64_t>& recv_counts) override {
    check(in, "all_to_all_v", false);
    check(out, "all_to_all_v", false);
    BRAID_CHECK(int(send_counts.size()) == size_ && int(recv_counts.size()) == size_,
                "all_to_all_v: one count per peer expected (", size_, ")");
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    int64_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      BRAID_CHECK(send_counts[p] >= 0 && recv_counts[p] >= 0, "all_to_all_v: negative count");
      sc[p] = int(send_counts[p]), sd[p] = int(so), rc[p] = int(recv_counts[p]), rd[p] = int(ro);
      so += send_counts[p], ro += recv_counts[p];
    }
    BRAID_CHECK(so <= in.numel() && ro <= out.numel() && ro < (int64_t(1) << 31),
                "all_to_all_v: counts (", so, " sent, ", ro, " received) exceed ", in.describe(),
                " / ", out.describe());
    BRAID_CHECK(in.dtype == out.dtype, "all_to_all_v: dtype mismatch");
    Scope s(*this, "all_to_all_v");
    MPI_CHECK(MPI_Alltoallv(in.data, sc.data(), sd.data(), mpi_type(in.dtype), out.data, rc.data(),
                            rd.data(), mpi_type(out.dtype), comm_));
  }
  void send(const Tensor& t, int peer) override {
    check(t, "send", false);
    Scope s(*this, "send");
    MPI_CHECK(MPI_Send(t.data, count(t), mpi_type(t.dtype), peer, 0, comm_));
  }
  void recv(const Tensor& t, int peer) override {
    check(t, "recv", false);
    Scope s(*this, "recv");
    MPI_CHECK(MPI_Recv(t.data, count(t), mpi_type(t.dtype), peer, 0, comm_, MPI_STATUS_IGNORE));
  }
  std::unique_ptr<PendingTransfer> isend(const Tensor& t, int peer, int tag) override {
    check(t, "isend", false);
    check_tag(tag);
    auto p = std::make_unique<Pending>(*this, "isend");
    MPI_CHECK(MPI_Isend(t.data, count(t), mpi_type(t.dtype), peer, tag, comm_, &p->request));
    return p;
  }
  std::unique_ptr<PendingTransfer> irecv(const Tensor& t, int peer, int tag) override {
    check(t, "irecv", false);
    check_tag(tag);
    auto p = std::make_unique<Pending>(*this, "irecv");
    MPI_CHECK(MPI_Irecv(t.data, count(t), mpi_type(t.dtype), peer, tag, comm_, &p->request));
    return p;
  }
  void barrier() override {
    Scope s(*this, "barrier");
    MPI_CHECK(MPI_Barrier(comm_));
  }
  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    MPI_Comm sub;
    {
      Scope s(*this, "split");
      MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    }
    return std::make_unique<MpiCommunicator>(sub, name, timeout_s_, true);
  }

 private:
  static void check_tag(int tag) {
    BRAID_CHECK(tag >= 0 && tag <= 32767, "point-to-point tag ", tag, " outside [0, 32767]");
  }
  // An MPI request, waited for under the watchdog.
  struct Pending : PendingTransfer {
    MpiCommunicator& c;
    const char* op;
    MPI_Request request = MPI_REQUEST_NULL;
    Pending(MpiCommunicator& comm, const char* what) : c(comm), op(what) {}
    ~Pending() override {
      if (request != MPI_REQUEST_NULL) MPI_Wait(&request, MPI_STATUS_IGNORE);
    }
    void wait() override {
      if (request == MPI_REQUEST_NULL) return;
      Scope s(c, op);
      MPI_CHECK(MPI_Wait(&request, MPI_STATUS_IGNORE));
    }
  };
  struct Scope {
    MpiCommunicator& c;
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    Scope(MpiCommunicator& comm, const char* op) : c(comm) { c.watchdog_->begin(op); }
    ~Scope() {
      c.watchdog_->end();
      c.seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  };
  void check(const Tensor& t, const char* op, bool reducible) const {
    BRAID_CHECK(t.device == Device::cpu && t.is_contiguous(), op, " on group '", name_,
                "': ", t.describe(),
                " must be a contiguous host tensor (the MPI backend moves CPU tensors)");
    BRAID_CHECK(!reducible || (t.dtype != DType::bf16 && t.dtype != DType::f16), op,
                ": MPI cannot reduce ", t.describe());
    BRAID_CHECK(t.numel() < (int64_t(1) << 31), op, ": ", t.describe(),
                " has more than 2^31 elements");
  }
  static int count(const Tensor& t) { return static_cast<int>(t.numel()); }

  MPI_Comm comm_;
  std::string name_;
  double timeout_s_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  std::unique_ptr<Watchdog> watchdog_;
  double seconds_ = 0;  // call_seconds()
};

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiSession::~MpiSession() {
  MPI_Finalize();
}

void mpi_abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);  // MPI_Abort does not return; this keeps the [[noreturn]] promise regardless
}

std::unique_ptr<Communicator> make_mpi_world(double timeout_s) {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world", timeout_s, false);
}

std::unique_ptr<Communicator> make_group(Communicator& world, const RankGrid& grid, Dim d) {
  static const char* names[] = {"tp", "cp", "dp", "pp", "etp", "ep", "edp"};
  BRAID_CHECK(grid.world_size() == world.size(), "make_group: grid of ", grid.world_size(),
              " ranks, world of ", world.size());
  const std::vector<int> ranks = grid.group(world.rank(), d);
  return world.split(ranks.front(), grid.coord(world.rank(), d), names[static_cast<int>(d)]);
}

std::unique_ptr<Communicator> make_data_group(Communicator& world, const RankGrid& grid) {
  BRAID_CHECK(grid.world_size() == world.size(), "make_data_group: grid of ", grid.world_size(),
              " ranks, world of ", world.size());
  const int r = world.rank();
  const int color = grid.coord(r, Dim::tp) + grid.size(Dim::tp) * grid.coord(r, Dim::pp);
  const int key = grid.coord(r, Dim::dp) * grid.size(Dim::cp) + grid.coord(r, Dim::cp);
  return world.split(color, key, "dp-cp");
}

#if !defined(BRAID_WITH_NCCL)
std::unique_ptr<Communicator> make_nccl(Communicator&, const std::string& name, double) {
  BRAID_FAIL("group '", name,
             "': this build has no NCCL (configure with -DBRAID_CUDA=ON where nccl.h and libnccl "
             "are found; NCCL_ROOT points at them)");
}
#endif

double comm_timeout_from_env(double fallback) {
  const char* v = std::getenv("BRAID_COMM_TIMEOUT_S");
  if (!v) return fallback;
  char* end = nullptr;
  const double t = std::strtod(v, &end);
  BRAID_REQUIRE(end != v && *end == '\0' && t > 0, "BRAID_COMM_TIMEOUT_S='", v,
                "' must be a positive number of seconds");
  return t;
}

}  // namespace braid
