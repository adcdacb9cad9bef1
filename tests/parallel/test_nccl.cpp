// The NCCL communicator (under mpirun, one rank per GPU; exit 77 when there are fewer GPUs than
// ranks): every collective and point-to-point call of the interface on GPU tensors against the
// values computed on the host, with small integers so that every sum is exact in f32, bf16 and
// i64; and a split into two groups. Fresh values per rank and call. Then the asynchronous
// transfers: a ring in which every rank receives before it sends (64 MiB, more than NCCL buffers),
// and the pipeline executor over NCCL: the chain of tests/pipeline_chain.h with its activations and
// gradients in GPU memory under the 1F1B and interleaved tables, against the whole chain on one
// process (f64, the same sums in at most another order of the microbatches: 1e-12 relative).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/launch_env.h"
#include "parallel/pipeline_executor.h"
#include "runtime/dtype.h"
#include "tests/mpi_test_util.h"
#include "tests/pipeline_chain.h"

namespace {

using namespace braid;

int failures = 0;
void expect(bool ok, const char* what, int rank) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: %s: wrong result\n", rank, what);
    ++failures;
  }
}

// A GPU copy of host values of dtype T.
template <typename T>
struct Dev {
  Tensor t;
  explicit Dev(const std::vector<T>& v, DType dtype) {
    void* p = nullptr;
    cudaMalloc(&p, v.size() * sizeof(T) + 1);
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    t = Tensor::contiguous_view(p, dtype, Device::cuda, {int64_t(v.size())}, "t");
  }
  ~Dev() { cudaFree(t.data); }
  std::vector<T> host() const {
    std::vector<T> v(t.numel());
    cudaMemcpy(v.data(), t.data, v.size() * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
};

float value(int rank, int64_t i) {
  return float((i * 7 + rank * 3) % 11 - 5);
}

// The chain's pieces of one stage with the tensors the executor moves in GPU memory: each action
// takes its input (or output gradient) from the GPU, runs the host chain, and puts its output (or
// input gradient) back.
class GpuChain : public PipeStage {
 public:
  GpuChain(int stage, int stages, int chunks, int microbatches)
      : host(stage, stages, chunks, microbatches), v_(chunks), last_(stages * chunks - 1) {
    n_ = size_t(microbatches) * chunks;
    cudaMalloc(&buf_, 4 * n_ * kElems * sizeof(double));
  }
  ~GpuChain() override { cudaFree(buf_); }
  Tensor input(int mb, int c) override { return view(0, mb, c); }
  Tensor output(int mb, int c) override { return view(1, mb, c); }
  Tensor output_grad(int mb, int c) override { return view(2, mb, c); }
  Tensor input_grad(int mb, int c) override { return view(3, mb, c); }
  void forward(int mb, int c) override {
    if (host.piece(c) != 0) copy(host.input(mb, c), input(mb, c), cudaMemcpyDeviceToHost);
    host.forward(mb, c);
    copy(output(mb, c), host.output(mb, c), cudaMemcpyHostToDevice);
  }
  void backward(int mb, int c) override {
    if (host.piece(c) != last_)
      copy(host.output_grad(mb, c), output_grad(mb, c), cudaMemcpyDeviceToHost);
    host.backward(mb, c);
    copy(input_grad(mb, c), host.input_grad(mb, c), cudaMemcpyHostToDevice);
  }
  test::ChainStage host;

 private:
  static constexpr size_t kElems = size_t(test::kRows) * test::kDim;
  Tensor view(int which, int mb, int c) {
    double* p = static_cast<double*>(buf_) + ((which * n_) + size_t(mb) * v_ + c) * kElems;
    return Tensor::contiguous_view(p, DType::f64, Device::cuda, {test::kRows, test::kDim}, "act");
  }
  static void copy(const Tensor& dst, const Tensor& src, cudaMemcpyKind kind) {
    cudaMemcpy(dst.data, src.data, kElems * sizeof(double), kind);  // after the queued work
  }
  int v_, last_;
  size_t n_ = 0;
  void* buf_ = nullptr;
};

void check_pipeline(PipeSchedule kind, int chunks, int microbatches, Communicator& pp,
                    Communicator& world, Backend& gpu, Backend& host) {
  const int s = pp.rank(), p_n = pp.size();
  GpuChain mine(s, p_n, chunks, microbatches);
  run_pipeline(make_schedule(kind, p_n, microbatches, chunks), mine, pp, gpu);
  cudaDeviceSynchronize();
  test::ChainStage whole(0, 1, p_n * chunks, microbatches);
  const std::unique_ptr<Communicator> self = world.split(world.rank(), 0, "self");
  run_pipeline(make_schedule(PipeSchedule::interleaved, 1, microbatches, p_n * chunks), whole,
               *self, host);
  const std::string what = "pipeline over NCCL, P " + std::to_string(p_n) + ", V " +
                           std::to_string(chunks) + ", M " + std::to_string(microbatches);
  const std::string bad = test::chain_mismatch(mine.host, chunks, microbatches, whole);
  expect(bad.empty(), (what + (bad.empty() ? "" : ": " + bad)).c_str(), s);
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  const int r = world->rank(), p = world->size();
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  if (gpus < p) {
    if (r == 0) std::printf("SKIP: %d GPUs for %d ranks (NCCL needs one GPU per rank)\n", gpus, p);
    return 77;
  }
  const int device = read_launch_env().local_rank % gpus;
  cudaSetDevice(device);
  const std::unique_ptr<Backend> gpu = make_cuda_backend(device), host = make_cpu_backend();
  try {
    auto nccl = make_nccl(*world, "world", comm_timeout_from_env(120));
    const int64_t n = 1000 * p + 3 * p;  // divisible by p
    std::vector<float> x(n), sum(n, 0.f), mx(n, -1e9f);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = value(r, i);
      for (int q = 0; q < p; ++q) sum[i] += value(q, i), mx[i] = std::max(mx[i], value(q, i));
    }
    {
      Dev<float> a(x, DType::f32), b(x, DType::f32);
      nccl->all_reduce(a.t, ReduceOp::sum);
      nccl->all_reduce(b.t, ReduceOp::max);
      expect(a.host() == sum, "all_reduce sum f32", r);
      expect(b.host() == mx, "all_reduce max f32", r);
    }
    {
      std::vector<bf16> xb(n), sb(n);
      for (int64_t i = 0; i < n; ++i) xb[i] = to_bf16(x[i]), sb[i] = to_bf16(sum[i]);
      Dev<bf16> a(xb, DType::bf16);
      nccl->all_reduce(a.t, ReduceOp::sum);
      const std::vector<bf16> got = a.host();
      bool ok = true;
      for (int64_t i = 0; i < n; ++i) ok = ok && got[i].bits == sb[i].bits;
      expect(ok, "all_reduce sum bf16", r);
    }
    {
      std::vector<int64_t> xi(n), si(n, 0);
      for (int64_t i = 0; i < n; ++i) xi[i] = int64_t(x[i]) << 33, si[i] = int64_t(sum[i]) << 33;
      Dev<int64_t> a(xi, DType::i64);
      nccl->all_reduce(a.t, ReduceOp::sum);
      expect(a.host() == si, "all_reduce sum i64", r);
    }
    {
      Dev<float> in(x, DType::f32), out(std::vector<float>(n / p, -7.f), DType::f32);
      nccl->reduce_scatter(in.t, out.t, ReduceOp::sum);
      expect(out.host() ==
                 std::vector<float>(sum.begin() + r * (n / p), sum.begin() + (r + 1) * (n / p)),
             "reduce_scatter", r);
    }
    {
      std::vector<float> mine(n / p), all(n);
      for (int64_t i = 0; i < n / p; ++i) mine[i] = value(r, i);
      for (int q = 0; q < p; ++q)
        for (int64_t i = 0; i < n / p; ++i) all[q * (n / p) + i] = value(q, i);
      Dev<float> in(mine, DType::f32), out(std::vector<float>(n, -7.f), DType::f32);
      nccl->all_gather(in.t, out.t);
      expect(out.host() == all, "all_gather", r);
    }
    {
      // Rank r sends r + q + 1 values to peer q, all equal to 100 r + q.
      std::vector<int64_t> sc(p), rc(p);
      std::vector<float> send, expect_recv;
      for (int q = 0; q < p; ++q) {
        sc[q] = r + q + 1, rc[q] = q + r + 1;
        send.insert(send.end(), sc[q], float(100 * r + q));
        expect_recv.insert(expect_recv.end(), rc[q], float(100 * q + r));
      }
      Dev<float> in(send, DType::f32),
          out(std::vector<float>(expect_recv.size(), -7.f), DType::f32);
      nccl->all_to_all_v(in.t, sc, out.t, rc);
      expect(out.host() == expect_recv, "all_to_all_v", r);
    }
    {
      // A ring: send to r + 1, receive from r - 1 (even ranks send first).
      Dev<float> s(std::vector<float>(17, float(r)), DType::f32),
          g(std::vector<float>(17, -7.f), DType::f32);
      const int next = (r + 1) % p, prev = (r + p - 1) % p;
      if (r % 2 == 0) {
        nccl->send(s.t, next);
        nccl->recv(g.t, prev);
      } else {
        nccl->recv(g.t, prev);
        nccl->send(s.t, next);
      }
      expect(g.host() == std::vector<float>(17, float(prev)), "send/recv", r);
    }
    {
      auto half = nccl->split(r % 2, r, "half");
      Dev<float> a(std::vector<float>(5, float(r)), DType::f32);
      half->all_reduce(a.t, ReduceOp::sum);
      float want = 0;
      for (int q = r % 2; q < p; q += 2) want += float(q);
      expect(a.host() == std::vector<float>(5, want) && half->size() == (p - r % 2 + 1) / 2,
             "split + all_reduce", r);
      half->barrier();
    }
    {
      // Every rank posts a receive from r - 1, then sends to r + 1, three rounds in a row.
      const int next = (r + 1) % p, prev = (r + p - 1) % p;
      const int64_t m = int64_t(16) << 20;  // floats: 64 MiB
      std::vector<std::unique_ptr<Dev<float>>> out, in;
      std::vector<std::unique_ptr<PendingTransfer>> pending;
      for (int round = 0; round < 3; ++round) {
        in.push_back(std::make_unique<Dev<float>>(std::vector<float>(m, -7.f), DType::f32));
        out.push_back(std::make_unique<Dev<float>>(std::vector<float>(m, float(1000 * round + r)),
                                                   DType::f32));
        pending.push_back(nccl->irecv(in.back()->t, prev, round));
        pending.push_back(nccl->isend(out.back()->t, next, round));
      }
      for (auto& t : pending) t->wait();
      for (int round = 0; round < 3; ++round)
        expect(in[round]->host() == std::vector<float>(m, float(1000 * round + prev)),
               ("isend/irecv ring, round " + std::to_string(round)).c_str(), r);
    }
    for (int mb : {p, 3 * p}) {
      check_pipeline(PipeSchedule::one_f_one_b, 1, mb, *nccl, *world, *gpu, *host);
      check_pipeline(PipeSchedule::interleaved, 2, mb, *nccl, *world, *gpu, *host);
    }
    nccl->barrier();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", r, e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures,
                             ("test_nccl (" + std::to_string(p) + " ranks)").c_str());
}
