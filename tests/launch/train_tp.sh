#!/usr/bin/env bash
# Tensor parallel end to end: `braid train` on one process, with tp=2 (2 MPI ranks) and with
# tp=2 x dp=2 (4 ranks; micro_batch halved, the same global batches), and with tp=2 and sequence
# parallelism (the residual stream split by rows), on the tiny hybrid (Mamba-1, MLP, Mamba-2,
# attention, MoE; every block split, the experts over the same ranks): the losses agree step by
# step; tp=2 resumes from the one-process step-4 checkpoint, and one process from the tp=2 x dp=2
# one and dp=4 (4 ranks) from it (tensor-parallel shards as boxes, ZeRO-1 runs within them), with
# the same losses; the sharded checkpoint verifies, and a truncated or two swapped shard files
# are refused with the file named. Usage: train_tp.sh BRAID CONFIG MPIRUN...
# Tolerance: as in train_dp.sh, the layouts differ only in how f32 sums are associated (partial
# products summed over ranks), about 1e-6 relative, which Adam (eps = 1e-3) turns into loss
# differences below 1e-4 relative over 8 steps. The MoE auxiliary losses are off (as in
# train_dp.sh): each data-parallel rank computes them over its own tokens, a real difference
# from one process that would hide the rounding-level agreement checked here.
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_layout_test "$@"
layout_args "$work"
run_layout a 0 train.micro_batch=4
run_layout b 2 train.micro_batch=4 parallel.tp=2 parallel.etp=2
run_layout c 4 train.micro_batch=2 parallel.tp=2 parallel.etp=2
run_layout s 2 train.micro_batch=4 parallel.tp=2 parallel.etp=2 parallel.sequence_parallel=true
grep -q "layout: 2 ranks, tp 2 (sequence parallel), cp 1, dp 1" "$work/s.log" ||
  { echo "FAIL: sequence parallelism is not on"; cat "$work/s.log"; exit 1; }
compare "tp=2 vs one process" "$(losses "$work/a/metrics.jsonl")" "$(losses "$work/b/metrics.jsonl")"
compare "tp=2 with sequence parallelism vs one process" "$(losses "$work/a/metrics.jsonl")" \
  "$(losses "$work/s/metrics.jsonl")"
compare "tp=2 x dp=2 vs one process" "$(losses "$work/a/metrics.jsonl")" "$(losses "$work/c/metrics.jsonl")"
"$braid" ckpt verify "$work/c/checkpoints/step_00000008" >/dev/null ||
  { echo "FAIL: the tp=2 x dp=2 checkpoint does not verify"; exit 1; }
[ "$(grep -c '"name": "rank_0000[0-9].h5"' "$work/c/checkpoints/step_00000004/manifest.json")" -eq 4 ] ||
  { echo "FAIL: the 4-rank checkpoint is not in 4 files"; exit 1; }
# Damaged copies of the tp=2 x dp=2 checkpoint: the file at fault is named.
for damage in truncate swap; do
  bad="$work/bad_$damage"
  cp -r "$work/c/checkpoints/step_00000008" "$bad"
  if [ "$damage" = truncate ]; then
    truncate -s -100 "$bad/rank_00001.h5"
    want="rank_00001.h5"
  else
    mv "$bad/rank_00000.h5" "$bad/tmp.h5" && mv "$bad/rank_00001.h5" "$bad/rank_00000.h5"
    mv "$bad/tmp.h5" "$bad/rank_00001.h5"
    want="rank_00000.h5"
  fi
  if "$braid" ckpt verify "$bad" >"$work/bad.log" 2>&1; then echo "FAIL: $damage passed verify"; exit 1; fi
  grep -q "$want" "$work/bad.log" || { echo "FAIL: $damage: $want not named"; cat "$work/bad.log"; exit 1; }
  echo "$damage shard refused: $(tail -n 1 "$work/bad.log")"
done
mkdir -p "$work/d/checkpoints" "$work/e/checkpoints" "$work/f/checkpoints"
cp -r "$work/a/checkpoints/step_00000004" "$work/d/checkpoints/"
cp -r "$work/c/checkpoints/step_00000004" "$work/e/checkpoints/"
cp -r "$work/c/checkpoints/step_00000004" "$work/f/checkpoints/"
run_layout d 2 train.micro_batch=4 parallel.tp=2 parallel.etp=2 checkpoint.resume=true
run_layout e 0 train.micro_batch=4 checkpoint.resume=true
run_layout f 4 train.micro_batch=1 checkpoint.resume=true
for r in d e f; do
  grep -q "resumed from .*step_00000004 at step 4" "$work/$r.log" || { echo "FAIL: $r did not resume"; cat "$work/$r.log"; exit 1; }
done
compare "tp=2 resumed from a 1-process checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/d/metrics.jsonl" | tail -n 4)"
compare "1 process resumed from a tp=2 x dp=2 checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/e/metrics.jsonl" | tail -n 4)"
compare "dp=4 resumed from a tp=2 x dp=2 checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/f/metrics.jsonl" | tail -n 4)"
echo "tensor-parallel training passed"
