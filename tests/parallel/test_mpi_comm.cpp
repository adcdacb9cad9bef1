// Multi-rank test of the MPI Communicator (run under mpirun with 2, 4 or 8 ranks): every
// collective against values computed locally, groups split from a RankGrid, and the failure
// count all-reduced so a failure on any rank fails the test. With --hang, rank 0 skips a barrier
// and the watchdog must end the job (tests/parallel/watchdog.sh).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/check.h"

namespace {

using namespace braid;

template <typename T>
Tensor view(std::vector<T>& v, const char* name) {
  return Tensor::contiguous_view(v.data(), dtype_of<T>(), Device::cpu,
                                 {static_cast<int64_t>(v.size())}, name);
}

int run_checks(Communicator& world) {
  const int r = world.rank(), n = world.size();
  int failures = 0, checks = 0;
  auto expect = [&](bool ok, const std::string& what) {
    ++checks;
    if (!ok) {
      ++failures;
      std::fprintf(stderr, "rank %d: FAILED %s\n", r, what.c_str());
    }
  };
  // all_reduce: sum of f32 / f64 / i64, and max.
  {
    std::vector<float> f(1000);
    std::vector<double> d(7);
    std::vector<int64_t> i(3);
    for (size_t k = 0; k < f.size(); ++k) f[k] = float(r + 1) * float(k);
    for (size_t k = 0; k < d.size(); ++k) d[k] = std::ldexp(1.0, r) + double(k);
    for (size_t k = 0; k < i.size(); ++k) i[k] = int64_t(r) * 1000000007LL + int64_t(k);
    world.all_reduce(view(f, "f"), ReduceOp::sum);
    world.all_reduce(view(d, "d"), ReduceOp::sum);
    world.all_reduce(view(i, "i"), ReduceOp::max);
    const float tri = float(n * (n + 1) / 2);
    bool ok = true;
    for (size_t k = 0; k < f.size(); ++k) ok = ok && f[k] == tri * float(k);
    expect(ok, "all_reduce sum f32");
    expect(d[3] == std::ldexp(1.0, n) - 1 + 3.0 * n, "all_reduce sum f64");
    expect(i[2] == int64_t(n - 1) * 1000000007LL + 2, "all_reduce max i64");
  }
  // reduce_scatter and all_gather are inverse views of the same sum.
  {
    const int m = 5;
    std::vector<float> in(m * n), out(m), gathered(m * n);
    for (int k = 0; k < m * n; ++k) in[k] = float(k * (r + 1));
    world.reduce_scatter(view(in, "in"), view(out, "out"), ReduceOp::sum);
    bool ok = true;
    for (int k = 0; k < m; ++k) ok = ok && out[k] == float((r * m + k) * (n * (n + 1) / 2));
    expect(ok, "reduce_scatter sum");
    world.all_gather(view(out, "out"), view(gathered, "gathered"));
    ok = true;
    for (int k = 0; k < m * n; ++k) ok = ok && gathered[k] == float(k * (n * (n + 1) / 2));
    expect(ok, "all_gather");
  }
  // all_to_all_v: rank r sends p + r + 1 values (all equal to 100 r + p) to peer p.
  {
    std::vector<int64_t> sc(n), rc(n);
    int64_t total_s = 0, total_r = 0;
    for (int p = 0; p < n; ++p)
      sc[p] = p + r + 1, rc[p] = r + p + 1, total_s += sc[p], total_r += rc[p];
    std::vector<int32_t> in(total_s), out(total_r, -1);
    for (int p = 0, o = 0; p < n; ++p)
      for (int64_t k = 0; k < sc[p]; ++k) in[o++] = 100 * r + p;
    world.all_to_all_v(view(in, "in"), sc, view(out, "out"), rc);
    bool ok = true;
    for (int p = 0, o = 0; p < n; ++p)
      for (int64_t k = 0; k < rc[p]; ++k) ok = ok && out[o++] == 100 * p + r;
    expect(ok, "all_to_all_v");
  }
  // send/recv around a ring (even ranks send first, so no cycle of blocking sends).
  {
    std::vector<float> msg(64, float(r)), got(64, -1.f);
    const int next = (r + 1) % n, prev = (r + n - 1) % n;
    if (n > 1) {
      if (r % 2 == 0) {
        world.send(view(msg, "msg"), next);
        world.recv(view(got, "got"), prev);
      } else {
        world.recv(view(got, "got"), prev);
        world.send(view(msg, "msg"), next);
      }
      expect(got[63] == float(prev), "send/recv ring");
    }
  }
  // Groups from a RankGrid: tp = 2 (when the size is even), the rest dp.
  if (n % 2 == 0) {
    Layout l;
    l.tp = 2, l.dp = n / 2;
    const RankGrid grid(l, n);
    auto tp = make_group(world, grid, Dim::tp);
    auto dp = make_group(world, grid, Dim::dp);
    expect(tp->size() == 2 && tp->rank() == grid.coord(r, Dim::tp), "tp group shape");
    expect(dp->size() == n / 2 && dp->rank() == grid.coord(r, Dim::dp), "dp group shape");
    std::vector<int64_t> v{int64_t(r)};
    tp->all_reduce(view(v, "v"), ReduceOp::sum);
    const std::vector<int> members = grid.group(r, Dim::tp);
    expect(v[0] == members[0] + members[1], "all_reduce within the tp group");
    std::vector<int64_t> w{int64_t(r)};
    dp->all_reduce(view(w, "w"), ReduceOp::sum);
    int64_t want = 0;
    for (int m : grid.group(r, Dim::dp)) want += m;
    expect(w[0] == want, "all_reduce within the dp group");
  }
  // call_seconds counts the host time inside calls: across a barrier that rank 0 reaches 100 ms
  // late, each rank's count grows by the time it spent in the call, measured around it here (the
  // count's interval lies inside that one: at most it, and at least it less the call's entry and
  // exit, allowed 50 ms on oversubscribed cores). Which ranks wait depends on scheduling, so the
  // 100 ms itself is not required of any one rank.
  {
    world.barrier();
    const double before = world.call_seconds();
    if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto t0 = std::chrono::steady_clock::now();
    world.barrier();
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double waited = world.call_seconds() - before;
    expect(waited >= 0 && waited <= wall + 1e-9 && waited >= wall - 0.05,
           "call_seconds holds the time in the barrier (" + std::to_string(waited) + " s of " +
               std::to_string(wall) + " s)");
  }
  // Misuse is an error, not a crash.
  {
    std::vector<float> a(3), b(5);
    bool threw = false;
    try {
      world.all_gather(view(a, "a"), view(b, "b"));
    } catch (const Error&) {
      threw = true;
    }
    expect(threw, "all_gather with a wrong output size throws");
  }
  std::vector<int32_t> f{failures};
  world.all_reduce(view(f, "failures"), ReduceOp::sum);
  if (r == 0) std::printf("%d ranks: %d passed, %d failed\n", n, checks * n - f[0], f[0]);
  return f[0];
}

}  // namespace

int main(int argc, char** argv) {
  braid::MpiSession mpi(&argc, &argv);
  try {
    auto world = braid::make_mpi_world(braid::comm_timeout_from_env(120));
    if (argc > 1 && std::strcmp(argv[1], "--hang") == 0) {
      if (world->rank() != 0) world->barrier();  // rank 0 never arrives
      return 0;
    }
    return run_checks(*world) == 0 ? 0 : 1;
  } catch (const braid::Error& e) {
    std::fprintf(stderr, "braid: error: %s\n", e.what());
    return 2;
  }
}
