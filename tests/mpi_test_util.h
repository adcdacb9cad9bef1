// Multi-rank test programs (run under mpirun, judged by their exit status).
#pragma once

#include <cstdint>
#include <cstdio>

#include "parallel/communicator.h"

namespace braid::test {

// The job's verdict: every rank's failures summed over world; rank 0 prints "<name>: N failures".
// Returns the exit status (0 when there were none), the same on every rank.
inline int mpi_test_exit(Communicator& world, int64_t failures, const char* name) {
  world.all_reduce(Tensor::contiguous_view(&failures, DType::i64, Device::cpu, {1}, "failures"),
                   ReduceOp::sum);
  if (world.rank() == 0) std::printf("%s: %lld failures\n", name, (long long)failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace braid::test
