// Pipeline schedules as pure logic: every table runs every forward and backward once per stage,
// forward first; simulated with backward = 2 x forward, no table deadlocks, the bubble equals the
// theory (P - 1) / (V M + P - 1) exactly, and each stage holds at most the activations the
// schedule promises (1F1B: P - s microbatches; GPipe: all M; interleaved: its warm-up + 1), per
// chunk too (what a chunk keeps activations for).
// A table that waits in a cycle is reported as a deadlock naming each stage's waiting action.
#include <gtest/gtest.h>

#include <algorithm>

#include "parallel/pipeline_schedule.h"
#include "tests/test_util.h"

namespace braid {
namespace {

using test::error_of;

TEST(PipelineSchedule, EveryTableIsCompleteDeadlockFreeAndMeetsTheBubbleTheory) {
  for (PipeSchedule kind :
       {PipeSchedule::gpipe, PipeSchedule::one_f_one_b, PipeSchedule::interleaved})
    for (int p : {1, 2, 3, 4, 8})
      for (int m : {p, 2 * p, 4 * p, 5 * p})
        for (int v :
             kind == PipeSchedule::interleaved ? std::vector<int>{1, 2, 3} : std::vector<int>{1}) {
          SCOPED_TRACE("schedule " + std::to_string(int(kind)) + ", P " + std::to_string(p) +
                       ", M " + std::to_string(m) + ", V " + std::to_string(v));
          const PipeTable t = make_schedule(kind, p, m, v);
          check_table(t);
          const PipeSimulation s = simulate(t, 1.0, 2.0);
          ASSERT_FALSE(s.deadlock) << s.stuck;
          EXPECT_NEAR(s.bubble, theoretical_bubble(p, m, v), 1e-12);
          EXPECT_DOUBLE_EQ(s.makespan, (double(m) * v + p - 1) * 3.0);
          for (int st = 0; st < p; ++st) {
            int promised = m;  // GPipe
            if (kind == PipeSchedule::one_f_one_b) promised = std::min(p - st, m);
            if (kind == PipeSchedule::interleaved)
              promised = m == p ? m * v : std::min(m * v, (p - st - 1) * 2 + (v - 1) * p + 1);
            EXPECT_EQ(s.peak_in_flight[st], promised) << "stage " << st;
            // Per chunk: 1F1B and GPipe hold what the stage does; interleaved chunks each hold
            // at most M, and together at least the stage's peak.
            const std::vector<int> chunks = chunk_peak_in_flight(t, st);
            ASSERT_EQ(int(chunks.size()), v);
            if (v == 1) {
              EXPECT_EQ(chunks[0], promised) << "stage " << st;
            }
            int sum = 0;
            for (int c : chunks) {
              EXPECT_LE(c, m);
              sum += c;
            }
            EXPECT_GE(sum, promised) << "stage " << st;
          }
        }
}

TEST(PipelineSchedule, BrokenTablesAreNamed) {
  PipeTable t = make_schedule(PipeSchedule::one_f_one_b, 2, 2);
  std::swap(t.actions[1][0], t.actions[1][1]);  // stage 1: backward of microbatch 0 first
  EXPECT_NE(error_of([&] { check_table(t); })
                .find("stage 1 runs the backward of microbatch 0, chunk 0 (action 0) before its "
                      "forward"),
            std::string::npos);
  t = make_schedule(PipeSchedule::one_f_one_b, 2, 2);
  t.actions[0].pop_back();
  EXPECT_NE(error_of([&] { check_table(t); }).find("stage 0 runs 2 forwards and 1 backwards"),
            std::string::npos);
  // Valid per stage, but stage 1 wants microbatch 1 first while stage 0 waits for microbatch 0's
  // backward: a cycle (the simulation finds it); the two stages also meet their messages in
  // different orders, which check_table names (NCCL would pair the wrong ones).
  t = {2,
       2,
       1,
       {{{true, 0, 0}, {false, 0, 0}, {true, 1, 0}, {false, 1, 0}},
        {{true, 1, 0}, {false, 1, 0}, {true, 0, 0}, {false, 0, 0}}}};
  EXPECT_NE(error_of([&] {
              check_table(t);
            }).find("stage 0 sends its activations to stage 1 in another order"),
            std::string::npos);
  const PipeSimulation s = simulate(t, 1.0, 2.0);
  EXPECT_TRUE(s.deadlock);
  EXPECT_NE(s.stuck.find("stage 0 waits at backward of microbatch 0"), std::string::npos)
      << s.stuck;
  EXPECT_NE(s.stuck.find("stage 1 waits at forward of microbatch 1"), std::string::npos) << s.stuck;
  EXPECT_NE(error_of([] {
              make_schedule(PipeSchedule::interleaved, 4, 6, 2);
            }).find("the microbatches (6) must be a multiple of the stages (4)"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              make_schedule(PipeSchedule::one_f_one_b, 4, 8, 2);
            }).find("need the interleaved schedule"),
            std::string::npos);
}

TEST(PipelineSchedule, StageCutsMinimiseTheSlowestStage) {
  EXPECT_EQ(balance_stages({1, 1, 1, 1, 1, 1, 1, 1}, 4), (std::vector<int>{0, 2, 4, 6}));
  // The attention layer (4) alone; the rest split around it.
  EXPECT_EQ(balance_stages({1, 1, 1, 1, 4, 1, 1}, 3), (std::vector<int>{0, 4, 5}));
  EXPECT_EQ(balance_stages({5, 1, 1, 1, 1, 1}, 2), (std::vector<int>{0, 1}));
  EXPECT_EQ(balance_stages(std::vector<double>(10, 1.0), 2), (std::vector<int>{0, 5}));
  EXPECT_NE(error_of([] {
              balance_stages({1, 1}, 3);
            }).find("must be between 1 and the 2 layers"),
            std::string::npos);
}

}  // namespace
}  // namespace braid
