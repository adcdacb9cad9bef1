// RankGrid coordinates and groups for dense and expert views; LaunchEnv parsing.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "parallel/launch_env.h"
#include "parallel/rank_grid.h"
#include "runtime/check.h"

namespace braid {
namespace {

TEST(RankGrid, DefaultOrderTpFastest) {
  Layout l;
  l.tp = 2, l.dp = 2, l.pp = 2;
  RankGrid g(l, 8);
  EXPECT_EQ(g.coord(5, Dim::tp), 1);
  EXPECT_EQ(g.coord(5, Dim::dp), 0);
  EXPECT_EQ(g.coord(5, Dim::pp), 1);
  EXPECT_EQ(g.group(5, Dim::tp), (std::vector<int>{4, 5}));
  EXPECT_EQ(g.group(5, Dim::dp), (std::vector<int>{5, 7}));
  EXPECT_EQ(g.group(5, Dim::pp), (std::vector<int>{1, 5}));
}

TEST(RankGrid, ExpertViewFoldsCpIntoEdp) {
  Layout l;
  l.tp = 2, l.cp = 2, l.dp = 2, l.ep = 4, l.etp = 1;
  RankGrid g(l, 8);
  EXPECT_EQ(g.size(Dim::edp), 2);
  EXPECT_EQ(g.group(0, Dim::ep), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(g.group(0, Dim::edp), (std::vector<int>{0, 4}));
  // Every rank appears in exactly one ep group of each edp coordinate.
  std::map<int, int> seen;
  for (int r = 0; r < 8; ++r) seen[g.coord(r, Dim::ep) + 4 * g.coord(r, Dim::edp)]++;
  EXPECT_EQ(seen.size(), 8u);
}

TEST(RankGrid, CustomOrder) {
  Layout l;
  l.tp = 2, l.dp = 3;
  l.order = "dp-tp-cp-ep-pp";
  RankGrid g(l, 6);
  EXPECT_EQ(g.group(0, Dim::dp), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(g.group(0, Dim::tp), (std::vector<int>{0, 3}));
}

TEST(RankGrid, ErrorsNameTheConstraint) {
  Layout l;
  l.tp = 3;
  try {
    RankGrid g(l, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must equal the number of ranks 4"), std::string::npos);
  }
  l.tp = 2, l.dp = 2, l.ep = 3;
  EXPECT_THROW(RankGrid(l, 4), Error);
  l.ep = 1;
  l.order = "tp-cp-dp-pp";
  EXPECT_THROW(RankGrid(l, 4), Error);
  l.order = "tp-cp-ep-dp-xx";
  EXPECT_THROW(RankGrid(l, 4), Error);
}

std::map<std::string, std::string>* g_env = nullptr;
const char* fake_getenv(const char* name) {
  auto it = g_env->find(name);
  return it == g_env->end() ? nullptr : it->second.c_str();
}

TEST(LaunchEnv, ReadsOpenMpiSlurmAndPlain) {
  std::map<std::string, std::string> env;
  g_env = &env;
  EXPECT_EQ(read_launch_env(&fake_getenv).world_size, 1);
  env = {{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}};
  LaunchEnv e = read_launch_env(&fake_getenv);
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.source, "SLURM");
  env["OMPI_COMM_WORLD_RANK"] = "0";
  env["OMPI_COMM_WORLD_SIZE"] = "2";
  EXPECT_EQ(read_launch_env(&fake_getenv).source, "Open MPI");
  env = {{"RANK", "4"}, {"WORLD_SIZE", "4"}};
  EXPECT_THROW(read_launch_env(&fake_getenv), Error);
  env = {{"RANK", "x"}, {"WORLD_SIZE", "4"}};
  EXPECT_THROW(read_launch_env(&fake_getenv), Error);
}

}  // namespace
}  // namespace braid
