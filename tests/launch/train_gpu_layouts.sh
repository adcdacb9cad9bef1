#!/usr/bin/env bash
# Combined layouts on 4 GPUs (a machine with 4 or more GPUs only): the tiny GPU hybrid with two
# MoE layers (4 experts, top-2) and two Mamba-2 groups on one GPU with train.grad_accum=4, against
# 4 ranks on the same microbatches: tp=2 x dp=2, tp=2 x dp=2 with the experts over ep=2 (etp=2),
# dp=4 with ep=4 (one expert per GPU), and dp=4; then the tp=2 x dp=2 step-10 checkpoint resumed
# with ep=4, and the ep=4 one on one GPU.
# Tolerances, from the 2-GPU scripts: layouts with tensor parallelism sum row-parallel outputs in
# bf16 over the ranks (train_gpu_tp.sh: 2^-5); the others differ in the order of f32 gradient sums
# and, through the bf16 weight copies, in the experts a few near-tie tokens choose
# (train_gpu_ep.sh: 2^-8).
# Usage: train_gpu_layouts.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 4 "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20 model.pattern=M*EME
      mamba2.groups=2 moe.experts=4 moe.top_k=2 moe.ffn=256)
run_layout one 0 train.grad_accum=4
run_layout tp2_dp2 4 train.grad_accum=2 parallel.tp=2 parallel.etp=2
run_layout tp2_ep2 4 train.grad_accum=2 parallel.tp=2 parallel.etp=2 parallel.ep=2
run_layout ep4 4 train.grad_accum=1 parallel.ep=4
run_layout dp4 4 train.grad_accum=1
grep -q "layout: 4 ranks, tp 2, cp 1, dp 2, ep 2" "$work/tp2_ep2.log" ||
  { echo "FAIL: not tp=2 x ep=2"; cat "$work/tp2_ep2.log"; exit 1; }
grep -q "layout: 4 ranks, tp 1, cp 1, dp 4, ep 4 (expert data parallel 1)" "$work/ep4.log" ||
  { echo "FAIL: not ep=4"; cat "$work/ep4.log"; exit 1; }
"$braid" ckpt verify "$work/tp2_dp2/checkpoints/step_00000010" >/dev/null
seed_from ep4_from_tp tp2_dp2 00000010
seed_from one_from_ep4 ep4 00000010
run_layout ep4_from_tp 4 train.grad_accum=1 parallel.ep=4 checkpoint.resume=true
run_layout one_from_ep4 0 train.grad_accum=4 checkpoint.resume=true
expect_resumed ep4_from_tp one_from_ep4
tp_tol=0.03125 tol=0.00390625
one=$(losses "$work/one/metrics.jsonl")
compare "tp=2 x dp=2 vs 1 GPU, losses" "$one" "$(losses "$work/tp2_dp2/metrics.jsonl")" $tp_tol
compare "tp=2 x dp=2 x ep=2 vs 1 GPU, losses" "$one" "$(losses "$work/tp2_ep2/metrics.jsonl")" \
  $tp_tol
compare "dp=4 x ep=4 vs 1 GPU, losses" "$one" "$(losses "$work/ep4/metrics.jsonl")" $tol
compare "dp=4 vs 1 GPU, losses" "$one" "$(losses "$work/dp4/metrics.jsonl")" $tol
compare_tail "ep=4 resumed from the tp=2 x dp=2 checkpoint vs that run, losses" tp2_dp2 \
  ep4_from_tp $tp_tol
compare_tail "1 GPU resumed from the ep=4 checkpoint vs that run, losses" ep4 one_from_ep4 $tol
echo "combined GPU layouts passed"
