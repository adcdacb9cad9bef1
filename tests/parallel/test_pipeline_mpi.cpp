// The pipeline executor under mpirun (pp = the number of ranks): a chain of P V pieces
// y = tanh(W_k x) split over the stages, loss 0.5 |y|^2 summed over M microbatches, run by the
// 1F1B, interleaved (V = 2) and GPipe tables: every piece's weight gradient and the first piece's
// input gradients equal the same chain on one process (f64; the same sums, in at most another
// order of the microbatches: 1e-12 relative). Then the bubble: stages that sleep t_f per forward
// and 2 t_f per backward, the executor's measured idle fraction 1 - busy / (P makespan) against
// the schedule's theory (P - 1) / (V M + P - 1), within 0.05 (sleep and transfer overheads of a
// few ms against a makespan of ~0.3-0.7 s).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/pipeline_executor.h"
#include "tests/mpi_test_util.h"
#include "tests/pipeline_chain.h"

namespace {

using namespace braid;
using namespace braid::test;

int failures = 0;

void check_gradients(PipeSchedule kind, int chunks, int microbatches, Communicator& pp,
                     Backend& host) {
  const int s = pp.rank(), p_n = pp.size();
  const PipeTable table = make_schedule(kind, p_n, microbatches, chunks);
  ChainStage mine(s, p_n, chunks, microbatches);
  run_pipeline(table, mine, pp, host);
  // The whole chain on this process: one stage holding every piece in order.
  ChainStage whole(0, 1, p_n * chunks, microbatches);
  const std::unique_ptr<Communicator> self = pp.split(pp.rank(), 0, "self");
  run_pipeline(make_schedule(PipeSchedule::interleaved, 1, microbatches, p_n * chunks), whole,
               *self, host);
  const std::string tag = "P " + std::to_string(p_n) + ", V " + std::to_string(chunks) + ", M " +
                          std::to_string(microbatches) + ": ";
  const std::string bad = chain_mismatch(mine, chunks, microbatches, whole);
  if (!bad.empty()) {
    std::fprintf(stderr, "rank %d: %s%s\n", s, tag.c_str(), bad.c_str());
    ++failures;
  }
}

// Stages that only sleep: t_f per forward, 2 t_f per backward.
class SleepStage : public PipeStage {
 public:
  SleepStage(int chunks, int microbatches, double t_f)
      : v_(chunks), t_f_(t_f), buf_(size_t(microbatches) * chunks * 4 * 8, 0.0) {}
  Tensor input(int mb, int c) override { return view(mb, c, 0); }
  Tensor output(int mb, int c) override { return view(mb, c, 1); }
  Tensor output_grad(int mb, int c) override { return view(mb, c, 2); }
  Tensor input_grad(int mb, int c) override { return view(mb, c, 3); }
  void forward(int, int) override {
    std::this_thread::sleep_for(std::chrono::duration<double>(t_f_));
  }
  void backward(int, int) override {
    std::this_thread::sleep_for(std::chrono::duration<double>(2 * t_f_));
  }

 private:
  Tensor view(int mb, int c, int which) {
    return Tensor::contiguous_view(&buf_[((size_t(mb) * v_ + c) * 4 + which) * 8], DType::f64,
                                   Device::cpu, {8}, "act");
  }
  int v_;
  double t_f_;
  std::vector<double> buf_;
};

void check_bubble(PipeSchedule kind, const char* name, int chunks, int microbatches,
                  Communicator& pp, Backend& host) {
  const double t_f = 0.01 / chunks;  // the same model cost whatever the chunking
  SleepStage stage(chunks, microbatches, t_f);
  const PipeRunStats st =
      run_pipeline(make_schedule(kind, pp.size(), microbatches, chunks), stage, pp, host);
  std::vector<double> v{st.total_s, st.busy_s};
  Tensor t = Tensor::contiguous_view(&v[0], DType::f64, Device::cpu, {1}, "t");
  pp.all_reduce(t, ReduceOp::max);
  Tensor b = Tensor::contiguous_view(&v[1], DType::f64, Device::cpu, {1}, "b");
  pp.all_reduce(b, ReduceOp::sum);
  const double bubble = 1 - v[1] / (pp.size() * v[0]);
  const double theory = theoretical_bubble(pp.size(), microbatches, chunks);
  if (pp.rank() == 0)
    std::printf("bubble %s P %d V %d M %d: measured %.4f, theory %.4f, makespan %.3f s\n", name,
                pp.size(), chunks, microbatches, bubble, theory, v[0]);
  if (!(std::fabs(bubble - theory) <= 0.05)) {
    if (pp.rank() == 0)
      std::fprintf(stderr, "%s: bubble %.4f against theory %.4f\n", name, bubble, theory);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world(comm_timeout_from_env(120));
  try {
    const int p_n = world->size();
    const std::unique_ptr<Backend> host = make_cpu_backend();
    for (int m : {p_n, 2 * p_n, 3 * p_n}) {
      check_gradients(PipeSchedule::one_f_one_b, 1, m, *world, *host);
      check_gradients(PipeSchedule::gpipe, 1, m, *world, *host);
      check_gradients(PipeSchedule::interleaved, 2, m, *world, *host);
    }
    check_gradients(PipeSchedule::one_f_one_b, 1, 1, *world, *host);
    check_bubble(PipeSchedule::one_f_one_b, "1F1B", 1, 8, *world, *host);
    check_bubble(PipeSchedule::interleaved, "interleaved", 2, 8, *world, *host);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", world->rank(), e.what());
    ++failures;
  }
  return test::mpi_test_exit(*world, failures, argv[0]);
}
