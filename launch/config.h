// The run configuration: YAML files with nested sections (model, mamba1, mamba2, attention, mlp,
// moe, train, data, optim) and key=value overrides on the command line. Every key is declared
// once in a registry with its type and a parser; an unknown key or a value that does not parse
// or fails validation is an error naming the key and where it came from (file:line or the
// command line). The resolved configuration can be written back as YAML.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "layers/model/model.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/rank_grid.h"

namespace braid {

struct TrainSettings {
  int64_t steps = 100;
  int64_t micro_batch = 8;  // B
  int64_t seq_len = 256;    // T
  int64_t grad_accum = 1;
  uint64_t seed = 1234;
  int64_t log_interval = 10;
  int64_t eval_interval = 100;
  int64_t eval_batches = 8;
  int64_t threads = 0;  // 0: all cores
  std::string device = "cpu";
  // Arithmetic of a GPU run: bf16 (mixed precision: bf16 activations and weight copies, f32
  // parameters, gradients and AdamW state) or fp32 (every tensor f32: the GPU-vs-CPU check; SSD
  // and attention then run simple f32 kernels, not the fast ones). The CPU runs in fp32; empty:
  // bf16 on GPUs, fp32 on the CPU.
  std::string precision;
  // Activation recompute: none, ssm (the Mamba mixers) or full (every block): their activations
  // are recomputed in the backward instead of kept.
  std::string recompute = "none";
  std::string out_dir = "runs/braid";
};

struct CheckpointSettings {
  std::string dir;           // "" = <train.out_dir>/checkpoints
  int64_t interval = 0;      // save every N steps (0: only at the end)
  bool save_final = true;    // save when the run ends (false: benchmark runs that keep nothing)
  int64_t keep = 3;          // newest committed checkpoints kept
  int64_t keep_every = 0;    // also kept forever: steps that are multiples of it (0: none)
  bool resume = false;       // continue from the newest checkpoint in dir, if any
  bool async = false;        // write in the background after a copy (one save in flight)
  int64_t max_attempts = 3;  // runs in a row from one checkpoint before a crash loop (exit 4)
};

struct DataSettings {
  std::vector<std::string> train;
  std::vector<std::string> valid;
};

struct RunConfig {
  ModelConfig model;
  Layout parallel;  // dp = 0 in a config means "the ranks left over": resolved at launch
  int64_t mamba1_expand = 2;
  int64_t mamba2_expand = 2;
  TrainSettings train;
  DataSettings data;
  CheckpointSettings checkpoint;
  AdamWConfig adamw;
  LrSchedule lr;
};

// Loads `path` over the defaults, then applies overrides ("section.key=value"), resolves derived
// sizes and validates. Errors are braid::Error with the location in the message.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides);
// The resolved configuration as YAML (every key, including defaults).
std::string config_to_yaml(const RunConfig& cfg);
// The layout for `world_size` ranks: dp = 0 becomes world / (tp * cp * pp); then the grid and the
// model's divisibility constraints are checked (errors name the constraint and what would work).
Layout resolve_layout(const RunConfig& cfg, int world_size);

// The resolved configuration as "section.key" -> value text (as in the YAML).
std::map<std::string, std::string> config_entries(const RunConfig& cfg);

}  // namespace braid
