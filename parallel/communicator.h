// Communicator: collectives and point-to-point transfers among the ranks of one process group,
// behind one interface with two backends: MPI (CPU tensors; every parallel path runs in CI as
// MPI ranks on one host) and NCCL (GPU tensors, with the distributed issues). Tensors must be
// contiguous; counts are in elements. Every call is checked where it is made, and a watchdog ends
// the job with a message naming the rank, the group and the operation when a call does not finish
// within the timeout, instead of hanging.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/rank_grid.h"
#include "runtime/tensor.h"

namespace braid {

enum class ReduceOp { sum, max };

// A point-to-point transfer under way (isend / irecv): wait() returns when it is done (under the
// watchdog); its tensor must stay untouched until then. Destroying it waits.
class PendingTransfer {
 public:
  virtual ~PendingTransfer() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;
  // Seconds spent in this communicator's transfers since it was made, where they held up the
  // caller: MPI, the host time in blocking calls and waits; NCCL, the GPU time between the start
  // and the end of each blocking or device-ordered call's transfer (the step's work waits for
  // it). NCCL's asynchronous all-reduce (gradient buckets, beside the backward) is not counted.
  virtual double call_seconds() const = 0;

  // t = reduce over ranks of t (in place).
  virtual void all_reduce(const Tensor& t, ReduceOp op) = 0;
  // The same, returning at once (NCCL: queued after the default stream's work so far); t is
  // reduced when the returned transfer's wait() returns, and must stay untouched until then.
  virtual std::unique_ptr<PendingTransfer> iall_reduce(const Tensor& t, ReduceOp op) = 0;
  // in [size * n] -> out [n]: out on rank r = reduce over ranks of in[r*n, (r+1)*n).
  virtual void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) = 0;
  // in [n] -> out [size * n]: out[r*n, (r+1)*n) = in of rank r.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // Device-ordered all_gather and reduce_scatter: NCCL queues them after the default stream's
  // work so far and makes its later work wait for them, and returns at once (the host does not
  // wait; a failure or a stuck peer shows at the next blocking call, under its watchdog). The
  // layers' exchanges inside a step use these. MPI: the blocking calls.
  virtual void all_gather_ordered(const Tensor& in, const Tensor& out) { all_gather(in, out); }
  virtual void reduce_scatter_ordered(const Tensor& in, const Tensor& out, ReduceOp op) {
    reduce_scatter(in, out, op);
  }
  // Sends send_counts[p] elements (consecutive in `in`, peers in order) to each peer p and
  // receives recv_counts[p] from each into `out`, in peer order.
  virtual void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_counts,
                            const Tensor& out, const std::vector<int64_t>& recv_counts) = 0;
  virtual void send(const Tensor& t, int peer) = 0;
  virtual void recv(const Tensor& t, int peer) = 0;
  // Transfers that return at once; a message is matched by (peer, tag), tag in [0, 32767].
  virtual std::unique_ptr<PendingTransfer> isend(const Tensor& t, int peer, int tag) = 0;
  virtual std::unique_ptr<PendingTransfer> irecv(const Tensor& t, int peer, int tag) = 0;
  virtual void barrier() = 0;
  // A communicator over the ranks of this one with the same color, ordered by key (collective:
  // every rank of this communicator calls it).
  virtual std::unique_ptr<Communicator> split(int color, int key, const std::string& name) = 0;
};

// Initialises MPI (thread level FUNNELED) for the life of the object, and finalises it.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

// Ends every rank of the job with `code` (after an error on one rank, so the others do not wait).
[[noreturn]] void mpi_abort(int code);

// MPI_COMM_WORLD as a Communicator; timeout_s bounds every call (watchdog).
std::unique_ptr<Communicator> make_mpi_world(double timeout_s);

// NCCL over the ranks of `bootstrap` (an MPI group of the same ranks: rank 0's unique id reaches
// the others through it), one GPU per rank (the current CUDA device); timeout_s bounds every
// call. A build without NCCL (it needs -DBRAID_CUDA=ON with nccl.h and libnccl found) throws.
std::unique_ptr<Communicator> make_nccl(Communicator& bootstrap, const std::string& name,
                                        double timeout_s);

// The group of this rank along dimension d of the grid (collective over `world`), named after d.
std::unique_ptr<Communicator> make_group(Communicator& world, const RankGrid& grid, Dim d);

// The ranks that differ from this one only in their cp and dp coordinates, ordered by (dp, cp):
// the group over which the gradients of replicated parameters are summed and ZeRO-1 shards its
// state (collective over `world`).
std::unique_ptr<Communicator> make_data_group(Communicator& world, const RankGrid& grid);

// Seconds from BRAID_COMM_TIMEOUT_S, else `fallback`; a malformed value is an error.
double comm_timeout_from_env(double fallback);

}  // namespace braid
