#include "parallel/rank_grid.h"

#include <sstream>

#include "runtime/check.h"

namespace braid {
namespace {

bool is_expert_dim(Dim d) {
  return d == Dim::etp || d == Dim::ep || d == Dim::edp;
}

}  // namespace

RankGrid::RankGrid(const Layout& l, int world_size) : layout_(l), world_(world_size) {
  for (auto [name, v] : {std::pair{"tp", l.tp},
                         {"cp", l.cp},
                         {"ep", l.ep},
                         {"dp", l.dp},
                         {"pp", l.pp},
                         {"etp", l.etp}})
    BRAID_REQUIRE(v >= 1, "parallel layout: ", name, " = ", v, " must be at least 1");
  // Parse the order: each of tp, cp, ep, dp, pp exactly once.
  std::vector<std::string> names;
  std::stringstream ss(l.order);
  for (std::string part; std::getline(ss, part, '-');) names.push_back(part);
  int seen[5] = {0, 0, 0, 0, 0};
  const char* known[5] = {"tp", "cp", "ep", "dp", "pp"};
  for (const auto& n : names) {
    int k = -1;
    for (int i = 0; i < 5; ++i)
      if (n == known[i]) k = i;
    BRAID_REQUIRE(k >= 0, "parallel layout: order '", l.order, "' has unknown dimension '", n,
                  "' (use tp, cp, ep, dp, pp)");
    ++seen[k];
  }
  for (int i = 0; i < 5; ++i)
    BRAID_REQUIRE(seen[i] == 1, "parallel layout: order '", l.order, "' must name ", known[i],
                  " exactly once");
  const int dense_size = l.tp * l.cp * l.dp * l.pp;
  BRAID_REQUIRE(dense_size == world_size, "parallel layout: tp*cp*dp*pp = ", l.tp, "*", l.cp, "*",
                l.dp, "*", l.pp, " = ", dense_size, " must equal the number of ranks ", world_size);
  const int per_stage = l.tp * l.cp * l.dp;
  BRAID_REQUIRE(per_stage % (l.etp * l.ep) == 0, "parallel layout: etp*ep = ", l.etp * l.ep,
                " must divide tp*cp*dp = ", per_stage, " (ranks per pipeline stage)");
  edp_ = per_stage / (l.etp * l.ep);
  int di = 0, ei = 0;
  for (const auto& n : names) {
    if (n == "tp") {
      dense_.dims[di] = Dim::tp, dense_.sizes[di++] = l.tp;
      expert_.dims[ei] = Dim::etp, expert_.sizes[ei++] = l.etp;
    } else if (n == "cp") {
      dense_.dims[di] = Dim::cp, dense_.sizes[di++] = l.cp;
    } else if (n == "ep") {
      expert_.dims[ei] = Dim::ep, expert_.sizes[ei++] = l.ep;
    } else if (n == "dp") {
      dense_.dims[di] = Dim::dp, dense_.sizes[di++] = l.dp;
      expert_.dims[ei] = Dim::edp, expert_.sizes[ei++] = edp_;
    } else {
      dense_.dims[di] = Dim::pp, dense_.sizes[di++] = l.pp;
      expert_.dims[ei] = Dim::pp, expert_.sizes[ei++] = l.pp;
    }
  }
}

int RankGrid::size(Dim d) const {
  switch (d) {
    case Dim::tp:
      return layout_.tp;
    case Dim::cp:
      return layout_.cp;
    case Dim::dp:
      return layout_.dp;
    case Dim::pp:
      return layout_.pp;
    case Dim::etp:
      return layout_.etp;
    case Dim::ep:
      return layout_.ep;
    case Dim::edp:
      return edp_;
  }
  return 1;
}

int RankGrid::coord_in(const View& v, int rank, Dim d) const {
  BRAID_REQUIRE(rank >= 0 && rank < world_, "rank ", rank, " outside a world of ", world_);
  int r = rank;
  for (int i = 0; i < 4; ++i) {
    if (v.dims[i] == d) return r % v.sizes[i];
    r /= v.sizes[i];
  }
  BRAID_FAIL("dimension not in this view");
}

int RankGrid::coord(int rank, Dim d) const {
  return coord_in(is_expert_dim(d) ? expert_ : dense_, rank, d);
}

std::vector<int> RankGrid::group_in(const View& v, int rank, Dim d) const {
  int stride = 1, k = 0;
  for (int i = 0; i < 4; ++i) {
    if (v.dims[i] == d) {
      k = i;
      break;
    }
    stride *= v.sizes[i];
  }
  const int c = coord_in(v, rank, d), base = rank - c * stride;
  std::vector<int> ranks;
  for (int j = 0; j < v.sizes[k]; ++j) ranks.push_back(base + j * stride);
  return ranks;
}

std::vector<int> RankGrid::group(int rank, Dim d) const {
  return group_in(is_expert_dim(d) ? expert_ : dense_, rank, d);
}

}  // namespace braid
