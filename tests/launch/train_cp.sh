#!/usr/bin/env bash
# Context parallel end to end: `braid train` on one process, with cp=2 (2 MPI ranks, each holding
# half of every sequence), cp=2 x dp=2 (4 ranks; micro_batch halved, the same global batches) and
# cp=2 x tp=2 with sequence parallelism (4 ranks), on the tiny hybrid (Mamba-1 and Mamba-2 pass
# states and conv halos between the shards, attention runs the load-balanced all-gather split,
# documents cross the shard edge): the training and held-out losses agree step by step; cp=2
# resumes from the one-process step-4 checkpoint and one process from the cp=2 x dp=2 one with
# the same losses; cp that does not divide the sequence length is refused with the constraint
# named. Usage: train_cp.sh BRAID CONFIG MPIRUN...
# Tolerance: as in train_tp.sh (the layouts differ only in how f32 sums are associated: the
# scans' states folded across ranks, gradients summed over ranks), 1e-4 relative over 8 steps;
# the MoE auxiliary losses are off (each rank would compute them over its own tokens).
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_layout_test "$@"
layout_args "$work"
evals() { grep '"kind": "eval"' "$1" | sed 's/.*"valid_loss": \([^,}]*\).*/\1/'; }
run_layout a 0 train.micro_batch=4
run_layout b 2 train.micro_batch=4 parallel.cp=2
run_layout c 4 train.micro_batch=2 parallel.cp=2
run_layout s 4 train.micro_batch=4 parallel.cp=2 parallel.tp=2 parallel.etp=2 parallel.sequence_parallel=true
grep -q "layout: 4 ranks, tp 2 (sequence parallel), cp 2, dp 1" "$work/s.log" ||
  { echo "FAIL: the cp x tp layout is not the one asked for"; cat "$work/s.log"; exit 1; }
grep -q "layout: 4 ranks, tp 1, cp 2, dp 2" "$work/c.log" ||
  { echo "FAIL: the cp x dp layout is not the one asked for"; cat "$work/c.log"; exit 1; }
for r in b c s; do
  compare "$r: training loss vs one process" "$(losses "$work/a/metrics.jsonl")" "$(losses "$work/$r/metrics.jsonl")"
done
# The held-out set is train.eval_batches micro-batches, so only runs with the same micro_batch
# evaluate the same rows.
for r in b s; do
  compare "$r: held-out loss vs one process" "$(evals "$work/a/metrics.jsonl")" "$(evals "$work/$r/metrics.jsonl")"
done
mkdir -p "$work/d/checkpoints" "$work/e/checkpoints"
cp -r "$work/a/checkpoints/step_00000004" "$work/d/checkpoints/"
cp -r "$work/c/checkpoints/step_00000004" "$work/e/checkpoints/"
run_layout d 2 train.micro_batch=4 parallel.cp=2 checkpoint.resume=true
run_layout e 0 train.micro_batch=4 checkpoint.resume=true
for r in d e; do
  grep -q "resumed from .*step_00000004 at step 4" "$work/$r.log" || { echo "FAIL: $r did not resume"; cat "$work/$r.log"; exit 1; }
done
compare "cp=2 resumed from a 1-process checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/d/metrics.jsonl" | tail -n 4)"
compare "1 process resumed from a cp=2 x dp=2 checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/e/metrics.jsonl" | tail -n 4)"
if run_layout bad 2 train.micro_batch=4 parallel.cp=2 train.seq_len=63 2>"$work/bad.err"; then
  echo "FAIL: cp=2 with seq_len 63 was accepted"; exit 1
fi
grep -q "parallel.cp = 2 must divide train.seq_len = 63" "$work/bad.err" "$work/bad.log" ||
  { echo "FAIL: the cp / seq_len error does not name the constraint"; cat "$work/bad.err"; exit 1; }
echo "context-parallel training passed"
