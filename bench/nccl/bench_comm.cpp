// Collective bandwidth through Braid's NCCL communicator (under mpirun, one rank per GPU): for
// bf16 tensors of 1 MiB to 1 GiB, the median time of 20 all-reduces (after 5 warm-ups), and at
// 1 GiB of reduce-scatter and all-gather, with the bus bandwidth as nccl-tests defines it:
// all-reduce bytes * 2 (n-1)/n / time; reduce-scatter and all-gather total bytes * (n-1)/n / time.
// Each call returns when its result is in place (the communicator waits on its stream), so the
// times include that wait. Usage: mpirun -np N bench_comm [--out results.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/launch_env.h"

namespace {

using namespace braid;

double median_s(Communicator& world, const std::function<void()>& f) {
  for (int i = 0; i < 5; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < 20; ++i) {
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(300));
  std::string out;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  const int p = world->size(), r = world->rank();
  if (gpus < p) {
    if (r == 0) std::fprintf(stderr, "bench_comm: %d GPUs for %d ranks\n", gpus, p);
    return 2;
  }
  cudaSetDevice(read_launch_env().local_rank % gpus);
  auto nccl = make_nccl(*world, "world", comm_timeout_from_env(300));
  const int64_t max_bytes = int64_t(1) << 30;
  void* buf = nullptr;
  void* big = nullptr;
  cudaMalloc(&buf, max_bytes);
  cudaMalloc(&big, max_bytes);
  cudaMemset(buf, 0, max_bytes);
  cudaMemset(big, 0, max_bytes);
  std::string json = "[";
  if (r == 0) std::printf("%-14s %12s %10s %12s\n", "collective", "bytes", "time us", "busbw GB/s");
  auto report = [&](const char* what, int64_t bytes, double s, double factor) {
    const double busbw = double(bytes) * factor / s / 1e9;
    if (r == 0) std::printf("%-14s %12lld %10.1f %12.1f\n", what, (long long)bytes, s * 1e6, busbw);
    char row[256];
    std::snprintf(row, sizeof(row),
                  "%s{\"collective\": \"%s\", \"bytes\": %lld, \"time_us\": %.2f, "
                  "\"busbw_gb_per_s\": %.2f}",
                  json.size() > 1 ? ", " : "", what, (long long)bytes, s * 1e6, busbw);
    json += row;
  };
  for (int64_t bytes = int64_t(1) << 20; bytes <= max_bytes; bytes *= 4) {
    const Tensor t =
        Tensor::contiguous_view(buf, DType::bf16, Device::cuda, {bytes / 2}, "allreduce");
    report("all_reduce", bytes, median_s(*world, [&] { nccl->all_reduce(t, ReduceOp::sum); }),
           2.0 * (p - 1) / p);
  }
  const Tensor whole =
      Tensor::contiguous_view(buf, DType::bf16, Device::cuda, {max_bytes / 2}, "in");
  const Tensor part =
      Tensor::contiguous_view(big, DType::bf16, Device::cuda, {max_bytes / 2 / p}, "part");
  report("reduce_scatter", max_bytes,
         median_s(*world, [&] { nccl->reduce_scatter(whole, part, ReduceOp::sum); }),
         double(p - 1) / p);
  report("all_gather", max_bytes, median_s(*world, [&] { nccl->all_gather(part, whole); }),
         double(p - 1) / p);
  json += "]";
  if (r == 0 && !out.empty()) {
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    FILE* f = std::fopen(out.c_str(), "w");
    std::fprintf(f, "{\"ranks\": %d, \"device\": \"%s\", \"dtype\": \"bf16\", \"results\": %s}\n",
                 p, prop.name, json.c_str());
    std::fclose(f);
  }
  cudaFree(buf);
  cudaFree(big);
  return 0;
}
