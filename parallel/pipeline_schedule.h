// Pipeline-parallel schedules as explicit action tables: for each of P stages, the list of
// forward and backward passes it runs, in order, over M microbatches and V model chunks per stage
// (virtual stages, Megatron-LM's interleaving: stage s holds chunks s, s + P, ..., s + (V-1) P of
// the P V pieces of the model). One executor runs any table; the activations and gradients that
// cross stages follow from it (the forward of piece k needs piece k-1's output, the backward of
// piece k needs piece k+1's input gradient and this piece's own forward).
//   gpipe              every forward, then every backward
//   one_f_one_b        PipeDream-flush: P - s - 1 warm-up forwards on stage s, then alternate
//                      one forward and one backward, then the remaining backwards
//   interleaved        the same over V chunks (M a multiple of P), Megatron-LM's order
// simulate() runs a table with given forward and backward times and reports the makespan, the
// bubble (idle) fraction, the most microbatches each stage holds activations for, and a
// deadlock (no stage can go on while actions remain) naming the stages and actions that wait.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace braid {

enum class PipeSchedule { gpipe, one_f_one_b, interleaved };

struct PipeAction {
  bool forward = true;
  int microbatch = 0;
  int chunk = 0;  // model chunk on this stage (0 .. V-1): piece chunk * P + stage
  bool operator==(const PipeAction&) const = default;
};

struct PipeTable {
  int stages = 1, microbatches = 1, chunks = 1;  // P, M, V
  std::vector<std::vector<PipeAction>> actions;  // [stage] in execution order
};

// The table of a schedule; throws naming the constraint that fails (P, M, V >= 1; V = 1 except
// for interleaved; interleaved needs M a multiple of P).
PipeTable make_schedule(PipeSchedule kind, int stages, int microbatches, int chunks = 1);

// Every stage runs the forward and the backward of every (microbatch, chunk) exactly once, the
// forward first; and for every two stages and direction, the sender's actions produce their
// messages in the order the receiver's actions consume them (NCCL, which has no tags, matches a
// pair's messages in order); throws naming the stage and action, or the two stages, otherwise.
void check_table(const PipeTable& table);

struct PipeSimulation {
  bool deadlock = false;
  std::string stuck;                // with deadlock: each stage's waiting action
  double makespan = 0;              // time until the last action ends
  double bubble = 0;                // idle fraction: 1 - busy time / (P * makespan)
  std::vector<int> peak_in_flight;  // [stage]: most microbatch-chunks forwarded, not backwarded
};
// Runs the table: an action starts when its stage is free and its inputs exist (the previous
// piece's forward of that microbatch, or the next piece's backward and this piece's forward);
// forward t_fwd and backward t_bwd per chunk; sends take no time.
PipeSimulation simulate(const PipeTable& table, double t_fwd, double t_bwd);

// The bubble fraction of a schedule with equal stages in theory: (P - 1) / (V M + P - 1) for
// 1F1B and interleaved (with t_bwd = 2 t_fwd or any other ratio), the same for GPipe.
double theoretical_bubble(int stages, int microbatches, int chunks);

// The most microbatches each of the stage's chunks holds at once (forwarded, not yet backwarded),
// [chunk]: how many microbatches' activations the chunk keeps.
std::vector<int> chunk_peak_in_flight(const PipeTable& table, int stage);

// Contiguous stage cuts of layers with the given costs into `stages` stages, minimising the most
// expensive stage; returns the first layer of each stage (size stages, first 0).
std::vector<int> balance_stages(const std::vector<double>& layer_costs, int stages);

}  // namespace braid
