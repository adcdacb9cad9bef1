#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <limits>
#include <map>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "runtime/check.h"

namespace braid {

PipeTable make_schedule(PipeSchedule kind, int stages, int microbatches, int chunks) {
  const int p = stages, m = microbatches, v = chunks;
  BRAID_REQUIRE(p >= 1 && m >= 1 && v >= 1, "pipeline schedule: stages (", p, "), microbatches (",
                m, ") and chunks (", v, ") must be at least 1");
  BRAID_REQUIRE(v == 1 || kind == PipeSchedule::interleaved,
                "pipeline schedule: model chunks per stage (", v,
                ") need the interleaved schedule");
  BRAID_REQUIRE(kind != PipeSchedule::interleaved || m % p == 0,
                "interleaved pipeline schedule: the microbatches (", m,
                ") must be a multiple of the stages (", p, ")");
  PipeTable t{p, m, v, std::vector<std::vector<PipeAction>>(p)};
  for (int s = 0; s < p; ++s) {
    std::vector<PipeAction>& a = t.actions[s];
    if (kind == PipeSchedule::gpipe) {
      for (int i = 0; i < m; ++i) a.push_back({true, i, 0});
      for (int i = 0; i < m; ++i) a.push_back({false, i, 0});
    } else if (kind == PipeSchedule::one_f_one_b) {
      const int warm = std::min(p - s - 1, m);
      for (int i = 0; i < warm; ++i) a.push_back({true, i, 0});
      for (int i = 0; i < m - warm; ++i) {
        a.push_back({true, warm + i, 0});
        a.push_back({false, i, 0});
      }
      for (int i = m - warm; i < m; ++i) a.push_back({false, i, 0});
    } else {
      // Megatron-LM's interleaved order: the k-th forward (backward) of a stage runs chunk
      // (k mod P V) / P (backward: counted from the last chunk) of microbatch
      // (k / (P V)) P + k mod P.
      const int total = m * v;
      const int warm = m == p ? total : std::min(total, (p - s - 1) * 2 + (v - 1) * p);
      auto action = [&](int k, bool fwd) {
        int chunk = k % (p * v) / p;
        if (!fwd) chunk = v - 1 - chunk;
        return PipeAction{fwd, k / (p * v) * p + k % p, chunk};
      };
      for (int k = 0; k < warm; ++k) a.push_back(action(k, true));
      for (int k = 0; k < total - warm; ++k) {
        a.push_back(action(warm + k, true));
        a.push_back(action(k, false));
      }
      for (int k = total - warm; k < total; ++k) a.push_back(action(k, false));
    }
  }
  return t;
}

void check_table(const PipeTable& t) {
  BRAID_REQUIRE(int(t.actions.size()) == t.stages, "pipeline table: ", t.actions.size(),
                " action lists for ", t.stages, " stages");
  for (int s = 0; s < t.stages; ++s) {
    std::map<std::pair<int, int>, int> fwd_at, bwd_at;  // (microbatch, chunk) -> position
    const auto& a = t.actions[s];
    for (int i = 0; i < int(a.size()); ++i) {
      const PipeAction& x = a[i];
      BRAID_REQUIRE(
          x.microbatch >= 0 && x.microbatch < t.microbatches && x.chunk >= 0 && x.chunk < t.chunks,
          "pipeline table: stage ", s, " action ", i, " names microbatch ", x.microbatch,
          ", chunk ", x.chunk, " outside ", t.microbatches, " x ", t.chunks);
      auto& seen = x.forward ? fwd_at : bwd_at;
      BRAID_REQUIRE(seen.emplace(std::pair{x.microbatch, x.chunk}, i).second,
                    "pipeline table: stage ", s, " runs the ", x.forward ? "forward" : "backward",
                    " of microbatch ", x.microbatch, ", chunk ", x.chunk, " twice");
      if (!x.forward)
        BRAID_REQUIRE(fwd_at.count({x.microbatch, x.chunk}), "pipeline table: stage ", s,
                      " runs the backward of microbatch ", x.microbatch, ", chunk ", x.chunk,
                      " (action ", i, ") before its forward");
    }
    BRAID_REQUIRE(
        fwd_at.size() == size_t(t.microbatches) * t.chunks && bwd_at.size() == fwd_at.size(),
        "pipeline table: stage ", s, " runs ", fwd_at.size(), " forwards and ", bwd_at.size(),
        " backwards, not ", t.microbatches * t.chunks, " of each");
  }
  // The messages between stages, per (sender, receiver, direction), in the order each end meets
  // them: the sender after the action that produces one (forward of piece k: to piece k + 1;
  // backward: to piece k - 1), the receiver before the action that consumes it.
  const int p = t.stages, pieces = t.stages * t.chunks;
  std::map<std::tuple<int, int, bool>, std::vector<std::pair<int, int>>> sent, received;
  for (int s = 0; s < p; ++s)
    for (const PipeAction& x : t.actions[s]) {
      const int k = x.chunk * p + s, to = x.forward ? k + 1 : k - 1,
                from = x.forward ? k - 1 : k + 1;
      if (from >= 0 && from < pieces && from % p != s)
        received[{from % p, s, x.forward}].push_back({x.microbatch, k});
      if (to >= 0 && to < pieces && to % p != s)
        sent[{s, to % p, x.forward}].push_back({x.microbatch, to});
    }
  std::set<std::tuple<int, int, bool>> pairs;
  for (const auto* m : {&sent, &received})
    for (const auto& entry : *m) pairs.insert(entry.first);
  for (const auto& key : pairs) {
    const auto& [from, to, forward] = key;
    BRAID_REQUIRE(sent[key] == received[key], "pipeline table: stage ", from, " sends its ",
                  forward ? "activations" : "gradients", " to stage ", to,
                  " in another order (or number) than that stage takes them");
  }
}

PipeSimulation simulate(const PipeTable& t, double t_fwd, double t_bwd) {
  const int p = t.stages, pieces = t.stages * t.chunks;
  constexpr double kNotYet = -1;
  // Finish times of forward and backward of (microbatch, piece).
  std::vector<double> fwd(size_t(t.microbatches) * pieces, kNotYet), bwd = fwd;
  auto at = [&](int mb, int piece) { return size_t(mb) * pieces + piece; };
  std::vector<size_t> next(p, 0);
  std::vector<double> free_at(p, 0);
  PipeSimulation out;
  out.peak_in_flight.assign(p, 0);
  std::vector<int> in_flight(p, 0);
  size_t remaining = 0;
  for (const auto& a : t.actions) remaining += a.size();
  double busy = 0;
  while (remaining > 0) {
    bool progressed = false;
    for (int s = 0; s < p; ++s) {
      if (next[s] == t.actions[s].size()) continue;
      const PipeAction& x = t.actions[s][next[s]];
      const int piece = x.chunk * p + s;
      double ready = free_at[s];
      if (x.forward) {
        if (piece > 0) {
          const double dep = fwd[at(x.microbatch, piece - 1)];
          if (dep == kNotYet) continue;
          ready = std::max(ready, dep);
        }
      } else {
        const double own = fwd[at(x.microbatch, piece)];
        if (own == kNotYet) continue;
        ready = std::max(ready, own);
        if (piece + 1 < pieces) {
          const double dep = bwd[at(x.microbatch, piece + 1)];
          if (dep == kNotYet) continue;
          ready = std::max(ready, dep);
        }
      }
      const double cost = x.forward ? t_fwd : t_bwd;
      free_at[s] = ready + cost;
      (x.forward ? fwd : bwd)[at(x.microbatch, piece)] = free_at[s];
      in_flight[s] += x.forward ? 1 : -1;
      out.peak_in_flight[s] = std::max(out.peak_in_flight[s], in_flight[s]);
      busy += cost;
      out.makespan = std::max(out.makespan, free_at[s]);
      ++next[s], --remaining, progressed = true;
    }
    if (!progressed) {
      out.deadlock = true;
      for (int s = 0; s < p; ++s)
        if (next[s] < t.actions[s].size()) {
          const PipeAction& x = t.actions[s][next[s]];
          out.stuck += "stage " + std::to_string(s) + " waits at " +
                       (x.forward ? "forward" : "backward") + " of microbatch " +
                       std::to_string(x.microbatch) + ", chunk " + std::to_string(x.chunk) + "; ";
        }
      return out;
    }
  }
  out.bubble = out.makespan > 0 ? 1.0 - busy / (p * out.makespan) : 0.0;
  return out;
}

double theoretical_bubble(int stages, int microbatches, int chunks) {
  const double p = stages, vm = double(microbatches) * chunks;
  return (p - 1) / (vm + p - 1);
}

std::vector<int> chunk_peak_in_flight(const PipeTable& table, int stage) {
  BRAID_CHECK(stage >= 0 && stage < table.stages, "pipeline: stage ", stage, " of ", table.stages);
  std::vector<int> now(table.chunks, 0), peak(table.chunks, 0);
  for (const PipeAction& a : table.actions[stage]) {
    int& n = now[a.chunk];
    n += a.forward ? 1 : -1;
    peak[a.chunk] = std::max(peak[a.chunk], n);
  }
  return peak;
}

std::vector<int> balance_stages(const std::vector<double>& costs, int stages) {
  const int n = int(costs.size());
  BRAID_REQUIRE(stages >= 1 && stages <= n, "pipeline stages (", stages, ") must be between 1 and ",
                "the ", n, " layers");
  std::vector<double> prefix(n + 1, 0);
  for (int i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + costs[i];
  // best[k][i]: the least possible most-expensive stage for layers [0, i) in k stages.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(n + 1, inf));
  std::vector<std::vector<int>> cut(stages + 1, std::vector<int>(n + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= stages; ++k)
    for (int i = k; i <= n; ++i)
      for (int j = k - 1; j < i; ++j) {
        const double c = std::max(best[k - 1][j], prefix[i] - prefix[j]);
        if (c < best[k][i]) best[k][i] = c, cut[k][i] = j;
      }
  std::vector<int> first(stages);
  for (int k = stages, i = n; k >= 1; --k) {
    first[k - 1] = cut[k][i];
    i = cut[k][i];
  }
  return first;
}

}  // namespace braid
