#!/usr/bin/env bash
# Tensor parallelism on GPUs (a machine with 2 or more GPUs only): the tiny GPU hybrid on one GPU
# against tp=2 (NCCL; every block split, vocabulary-parallel embedding and cross-entropy, ZeRO-1
# over a data group of one), with and without sequence parallelism, and checkpoints resumed across
# the layouts.
# - tp=2 resumed from its own step-10 checkpoint repeats steps 11-20 bit for bit.
# - tp=2 vs 1 GPU: the row-parallel outputs are summed over the two ranks in bf16, one more bf16
#   rounding (2^-9 relative) of activations that are already stored in bf16, the same order of
#   change as between a GPU run and the CPU's; the tolerance is that test's, 2^-5 (train_gpu.sh).
# - Resumes 1 GPU -> tp=2 and tp=2 -> 1 GPU track the runs they continue within the same tolerance.
# Usage: train_gpu_tp.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 2 "$@"
# Two Mamba-2 groups, so that tp=2 can split them.
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20 mamba2.groups=2)
run_layout one 0
run_layout tp 2 parallel.tp=2
run_layout tp_sp 2 parallel.tp=2 parallel.sequence_parallel=true
grep -q "layout: 2 ranks, tp 2" "$work/tp.log" || { echo "FAIL: not tp=2"; cat "$work/tp.log"; exit 1; }
tol=0.03125
compare "tp=2 vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/tp/metrics.jsonl")" $tol
compare "tp=2 with sequence parallelism vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/tp_sp/metrics.jsonl")" $tol
one_args=()
resume_across tp 2 $tol parallel.tp=2
echo "tensor-parallel GPU training passed"
