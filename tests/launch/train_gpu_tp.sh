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
"$braid" ckpt verify "$work/tp/checkpoints/step_00000010" >/dev/null
seed_from tp_resumed tp 00000010
seed_from one_from_tp tp 00000010
seed_from tp_from_one one 00000010
run_layout tp_resumed 2 parallel.tp=2 checkpoint.resume=true
run_layout one_from_tp 0 checkpoint.resume=true
run_layout tp_from_one 2 parallel.tp=2 checkpoint.resume=true
expect_resumed tp_resumed one_from_tp tp_from_one
tol=0.03125
compare_tail "tp=2 resumed from its step-10 checkpoint vs straight through, losses" tp tp_resumed 0
compare "tp=2 vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/tp/metrics.jsonl")" $tol
compare "tp=2 with sequence parallelism vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/tp_sp/metrics.jsonl")" $tol
compare_tail "1 GPU resumed from the tp=2 checkpoint vs the tp=2 run, losses" tp one_from_tp $tol
compare_tail "tp=2 resumed from the 1-GPU checkpoint vs the 1-GPU run, losses" one tp_from_one $tol
echo "tensor-parallel GPU training passed"
