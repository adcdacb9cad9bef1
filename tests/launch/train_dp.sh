#!/usr/bin/env bash
# Data parallel end to end: `braid train` on one process (micro_batch 4) and as 2 MPI ranks
# (micro_batch 2, ZeRO-1) see the same global batches, so their losses agree step by step; and a
# 2-rank run resumed from the single-process step-4 checkpoint (another layout) continues with
# the same losses; background (asynchronous) sharded saves hold the same bytes as synchronous
# ones. Usage: train_dp.sh BRAID CONFIG MPIRUN...
# Tolerance: the runs differ only in how f32 sums are associated (per-rank partial sums), about
# 1e-6 relative; Adam's slope lr/eps turns that into parameter differences of at most
# lr * 1e-6 / eps per step, so with eps = 1e-3 the losses over 8 steps agree to 1e-4 relative.
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_layout_test "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=8 train.seq_len=64
      optim.warmup=2 optim.eps=0.001 train.log_interval=4 train.eval_interval=8 train.eval_batches=2
      model.d_model=64 mlp.ffn=128 moe.ffn=64 mamba2.head_dim=16 mamba2.chunk=16 moe.aux_loss_coef=0
      moe.z_loss_coef=0 checkpoint.interval=4 train.threads=1)
"$braid" train --config "$config" "${args[@]}" train.micro_batch=4 train.out_dir="$work/a" >"$work/a.log"
"${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.micro_batch=2 \
  train.out_dir="$work/b" >"$work/b.log"
compare "dp=2 vs one process" "$(losses "$work/a/metrics.jsonl")" "$(losses "$work/b/metrics.jsonl")"
# Gradient buckets summed during the backward (20 KB: dozens of buckets; 25 MB: one bucket here)
# and the reduction after the backward (the default) add the same two numbers per element:
# bit-identical losses. A bucket summed before its gradients were final would differ.
for mb in 0.02 25; do
  "${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.micro_batch=2 \
    train.grad_accum=2 parallel.grad_bucket_mb=$mb train.out_dir="$work/bucket_$mb" >"$work/bucket_$mb.log"
done
"${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.micro_batch=2 \
  train.grad_accum=2 train.out_dir="$work/bucket_default" >"$work/bucket_default.log"
grep -q "gradients: [0-9][0-9] buckets" "$work/bucket_0.02.log" ||
  { echo "FAIL: no gradient buckets"; cat "$work/bucket_0.02.log"; exit 1; }
for mb in 0.02 25; do
  [ "$(losses "$work/bucket_default/metrics.jsonl")" = "$(losses "$work/bucket_$mb/metrics.jsonl")" ] ||
    { echo "FAIL: parallel.grad_bucket_mb=$mb changes the losses"; exit 1; }
done
echo "gradient buckets (20 KB, 25 MB, none): bit-identical losses"
mkdir -p "$work/c/checkpoints"
cp -r "$work/a/checkpoints/step_00000004" "$work/c/checkpoints/"
"${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.micro_batch=2 \
  train.out_dir="$work/c" checkpoint.resume=true >"$work/c.log"
grep -q "resumed from .*step_00000004 at step 4" "$work/c.log" || { echo "FAIL: no resume"; cat "$work/c.log"; exit 1; }
compare "dp=2 resumed from a 1-process checkpoint" "$(losses "$work/a/metrics.jsonl" | tail -n 4)" \
  "$(losses "$work/c/metrics.jsonl" | tail -n 4)"
# MoE balancing bias: the per-expert counts are summed over the ranks, so the bias (and the
# routing it steers) stays the same as on one process.
bias=(moe.score=sigmoid moe.normalize_topk=true moe.balance_bias=true moe.bias_update_rate=0.01)
"$braid" train --config "$config" "${args[@]}" "${bias[@]}" train.micro_batch=4 train.out_dir="$work/d" >/dev/null
"${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" "${bias[@]}" train.micro_batch=2 \
  train.out_dir="$work/e" >/dev/null
compare "dp=2 vs one process, MoE balancing bias" "$(losses "$work/d/metrics.jsonl")" "$(losses "$work/e/metrics.jsonl")"
# The bias moves by +-rate steps from integer counts: with the counts summed it is bit-identical.
bias_digest() {
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))
print(" ".join(t["pieces"][0]["sha256"] for t in m["tensors"] if t["kind"]=="param" and "e_score_correction_bias" in t["name"]))' \
    "$1/checkpoints/step_00000008/manifest.json"
}
[ -n "$(bias_digest "$work/d")" ] && [ "$(bias_digest "$work/d")" = "$(bias_digest "$work/e")" ] ||
  { echo "FAIL: the MoE balancing bias differs between dp=2 and one process"; exit 1; }
echo "MoE balancing bias: identical to the single-process run"
# A 2-rank (sharded) checkpoint converted to one file holds the same tensors: one process resumes
# from either with bit-identical losses.
[ "$(grep -c '"name": "rank_0000[0-9].h5"' "$work/b/checkpoints/step_00000004/manifest.json")" -eq 2 ] ||
  { echo "FAIL: the 2-rank checkpoint is not in 2 files"; exit 1; }
"$braid" ckpt convert "$work/b/checkpoints/step_00000004" "$work/f/checkpoints" >/dev/null
"$braid" ckpt verify "$work/f/checkpoints/step_00000004" >/dev/null || { echo "FAIL: converted checkpoint"; exit 1; }
mkdir -p "$work/g/checkpoints"
cp -r "$work/b/checkpoints/step_00000004" "$work/g/checkpoints/"
for run in f g; do
  "$braid" train --config "$config" "${args[@]}" train.micro_batch=4 train.out_dir="$work/$run" \
    checkpoint.resume=true >"$work/$run.log"
done
[ "$(losses "$work/f/metrics.jsonl")" = "$(losses "$work/g/metrics.jsonl")" ] ||
  { echo "FAIL: resuming from the converted checkpoint differs"; exit 1; }
echo "2-rank checkpoint (2 files) converted to one file: one process resumes identically from either"
# Background (asynchronous) sharded saves: every rank writes its file in a thread, the ranks
# commit together at a later step; the checkpoints hold the same bytes as the synchronous ones.
"${mpirun_cmd[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.micro_batch=2 \
  train.out_dir="$work/h" checkpoint.async=true >"$work/h.log"
grep -q "every rank writes its shard in the background" "$work/h.log" ||
  { echo "FAIL: no background sharded save"; cat "$work/h.log"; exit 1; }
pieces() {
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))
print(sorted((t["kind"],t["name"],p.get("start",0),p["sha256"]) for t in m["tensors"] for p in t["pieces"]))' "$1"
}
for step in 00000004 00000008; do
  [ "$(pieces "$work/b/checkpoints/step_$step/manifest.json")" = "$(pieces "$work/h/checkpoints/step_$step/manifest.json")" ] ||
    { echo "FAIL: the background save of step $step differs from the synchronous one"; exit 1; }
done
[ "$(losses "$work/b/metrics.jsonl")" = "$(losses "$work/h/metrics.jsonl")" ] ||
  { echo "FAIL: losses differ with background saves"; exit 1; }
echo "2-rank background saves: the same pieces and digests as the synchronous saves"
echo "data-parallel training passed"
