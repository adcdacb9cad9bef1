#include "parallel/pipeline_executor.h"

#include <cstring>
#include <memory>
#include <vector>

namespace braid {

PipeRunStats run_pipeline(const PipeTable& table, PipeStage& stage, Communicator& pp,
                          Backend& timer) {
  check_table(table);
  BRAID_CHECK(pp.size() == table.stages, "pipeline: the pp group has ", pp.size(),
              " ranks, the schedule ", table.stages, " stages");
  const int s = pp.rank(), p_n = table.stages, pieces = table.stages * table.chunks;
  BRAID_CHECK(int64_t(table.microbatches) * pieces * 2 <= 32768, "pipeline: ", table.microbatches,
              " microbatches x ", pieces, " pieces exceed the transfer tags (at most 16384 pairs)");
  auto tag = [&](bool forward, int mb, int piece) { return (mb * pieces + piece) * 2 + !forward; };
  const std::vector<PipeAction>& acts = table.actions[s];
  // What an action receives before it can run (none for the model's first forward and last
  // backward, or when the neighbouring piece is on this stage: then it is copied).
  struct Need {
    bool any = false, local = false;
    int peer = 0, tag = 0;
  };
  auto need_of = [&](const PipeAction& a) {
    const int k = a.chunk * p_n + s, from = a.forward ? k - 1 : k + 1;
    Need n;
    if (from < 0 || from >= pieces) return n;
    n.any = true, n.peer = from % p_n, n.local = n.peer == s;
    n.tag = tag(a.forward, a.microbatch, k);
    return n;
  };
  auto buffer_of = [&](const PipeAction& a) {
    return a.forward ? stage.input(a.microbatch, a.chunk)
                     : stage.output_grad(a.microbatch, a.chunk);
  };
  auto post = [&](const PipeAction& a) -> std::unique_ptr<PendingTransfer> {
    const Need n = need_of(a);
    if (!n.any || n.local) return nullptr;
    return pp.irecv(buffer_of(a), n.peer, n.tag);
  };
  std::vector<std::unique_ptr<PendingTransfer>> sends;
  // Events: the start, the end, and each action's begin and end.
  std::vector<Event> ev(2 + 2 * acts.size());
  for (Event& e : ev) e = timer.create_event(true);
  pp.barrier();
  timer.record(ev[0], {});
  std::unique_ptr<PendingTransfer> next = acts.empty() ? nullptr : post(acts[0]);
  for (size_t i = 0; i < acts.size(); ++i) {
    const PipeAction& a = acts[i];
    std::unique_ptr<PendingTransfer> mine = std::move(next);
    if (mine) mine->wait();
    if (i + 1 < acts.size()) next = post(acts[i + 1]);
    timer.record(ev[2 + 2 * i], {});
    if (a.forward)
      stage.forward(a.microbatch, a.chunk);
    else
      stage.backward(a.microbatch, a.chunk);
    timer.record(ev[3 + 2 * i], {});
    // Pass the result on: forward to piece k + 1, backward to piece k - 1.
    const int k = a.chunk * p_n + s, to = a.forward ? k + 1 : k - 1;
    if (to < 0 || to >= pieces) continue;
    const Tensor out =
        a.forward ? stage.output(a.microbatch, a.chunk) : stage.input_grad(a.microbatch, a.chunk);
    if (to % p_n == s) {  // the neighbouring piece is on this stage (P = 1)
      const int c = to / p_n;
      const Tensor dst =
          a.forward ? stage.input(a.microbatch, c) : stage.output_grad(a.microbatch, c);
      BRAID_CHECK(out.device == Device::cpu && dst.device == Device::cpu,
                  "pipeline: one stage holding consecutive pieces (pp = 1 with virtual stages) "
                  "hands them over on the host only");
      BRAID_CHECK(dst.nbytes() == out.nbytes(), "pipeline: piece ", k, " passes ", out.describe(),
                  " to ", dst.describe());
      std::memcpy(dst.data, out.data, out.nbytes());
    } else {
      sends.push_back(pp.isend(out, to % p_n, tag(a.forward, a.microbatch, to)));
    }
  }
  for (auto& t : sends) t->wait();
  timer.record(ev[1], {});
  PipeRunStats st;
  st.total_s = timer.elapsed_ms(ev[0], ev[1]) / 1e3;
  for (size_t i = 0; i < acts.size(); ++i)
    st.busy_s += timer.elapsed_ms(ev[2 + 2 * i], ev[3 + 2 * i]) / 1e3;
  for (Event& e : ev) timer.destroy_event(e);
  return st;
}

}  // namespace braid
