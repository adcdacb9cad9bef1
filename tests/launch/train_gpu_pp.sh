#!/usr/bin/env bash
# Pipeline parallelism on GPUs (a machine with 2 or more GPUs only): the tiny GPU hybrid on one GPU
# against pp=2 (NCCL carries the activations and their gradients between the stages, and the
# tied embedding table's gradient between the first and last stage), 1F1B and interleaved (2
# chunks per stage), and checkpoints resumed across the layouts.
# - pp=2 resumed from its own step-10 checkpoint repeats steps 11-20 bit for bit.
# - pp=2 vs 1 GPU: the stages hand over their bf16 activations and gradients unchanged and recompute
#   a forward with the same kernels on the same inputs; what differs is the association of f32
#   sums (the tied table's two gradient parts, added per microbatch on one GPU, per stage and then
#   over the pair under pp). A bf16 weight copy that rounds the other way after such a change
#   moves the losses by the order of a GPU run against the CPU's: the tolerance is that test's,
#   2^-5 (train_gpu.sh).
# - Resumes 1 GPU -> pp=2 and pp=2 -> 1 GPU track the runs they continue within the same tolerance.
# Usage: train_gpu_pp.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 2 "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20)
run_layout one 0
run_layout pp 2 parallel.pp=2
run_layout ppv 2 parallel.pp=2 parallel.virtual_stages=2
grep -q "layout: 2 ranks, tp 1, cp 1, dp 1, ep 1 (expert data parallel 1), pp 2" "$work/pp.log" ||
  { echo "FAIL: not pp=2"; cat "$work/pp.log"; exit 1; }
grep -q "pipeline: 2 stages x 2 chunks" "$work/ppv.log" ||
  { echo "FAIL: ppv is not interleaved"; cat "$work/ppv.log"; exit 1; }
tol=0.03125
compare "pp=2 vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/pp/metrics.jsonl")" $tol
compare "pp=2 interleaved (2 chunks per stage) vs 1 GPU, losses" \
  "$(losses "$work/one/metrics.jsonl")" "$(losses "$work/ppv/metrics.jsonl")" $tol
one_args=()
resume_across pp 2 $tol parallel.pp=2
echo "pipeline-parallel GPU training passed"
