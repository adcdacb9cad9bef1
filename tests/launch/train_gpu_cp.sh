#!/usr/bin/env bash
# Context parallelism on GPUs (a machine with 2 or more GPUs only): the tiny GPU hybrid (Mamba-2,
# attention, MLP) on one GPU against cp=2, each rank holding half of every sequence: SSD passes
# its states and the convs their halos between the ranks, attention all-gathers its keys for the
# load-balanced causal split, all over NCCL; checkpoints resumed across the layouts; and the same
# model with a Mamba-1 mixer first (the selective scan's states passed).
# - cp=2 vs 1 GPU: the shards' states cross in f32 where the one-GPU run keeps its chunk states,
#   and dk, dv are summed over the ranks in bf16: the kernels' rounding, not the algorithm,
#   differs, so the tolerance is the GPU-against-CPU test's, 2^-5 (train_gpu.sh).
# - Resumes cp=2 -> cp=2 (its own step-10 checkpoint), 1 GPU -> cp=2 and cp=2 -> 1 GPU track the
#   runs they continue within the same tolerance.
# Usage: train_gpu_cp.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 2 "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20)
run_layout one 0
run_layout cp 2 parallel.cp=2
grep -q "layout: 2 ranks, tp 1, cp 2, dp 1" "$work/cp.log" ||
  { echo "FAIL: not cp=2"; cat "$work/cp.log"; exit 1; }
tol=0.03125
compare "cp=2 vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/cp/metrics.jsonl")" $tol
one_args=()
resume_across cp 2 $tol parallel.cp=2
# With a Mamba-1 mixer in place of the first Mamba-2 one (its scan passes states the same way).
run_layout one_s 0 model.pattern=S*-M-
run_layout cp_s 2 parallel.cp=2 model.pattern=S*-M-
compare "cp=2 vs 1 GPU with a Mamba-1 layer, losses" "$(losses "$work/one_s/metrics.jsonl")" \
  "$(losses "$work/cp_s/metrics.jsonl")" $tol
echo "context-parallel GPU training passed"
