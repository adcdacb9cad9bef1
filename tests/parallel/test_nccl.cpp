// The NCCL communicator (under mpirun, one rank per GPU; exit 77 when there are fewer GPUs than
// ranks): every collective and point-to-point call of the interface on GPU tensors against the
// values computed on the host, with small integers so that every sum is exact in f32, bf16 and
// i64; and a split into two groups. Fresh values per rank and call.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/launch_env.h"
#include "runtime/dtype.h"
#include "tests/mpi_test_util.h"

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
  cudaSetDevice(read_launch_env().local_rank % gpus);
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
    nccl->barrier();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", r, e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures,
                             ("test_nccl (" + std::to_string(p) + " ranks)").c_str());
}
