#!/usr/bin/env bash
# Data parallelism on GPUs (a machine with 2 or more GPUs only): the tiny GPU hybrid on one GPU
# with train.grad_accum=4 against 2 ranks x 2 GPUs (NCCL, ZeRO-1) with grad_accum=2 (the same
# samples in every step), and checkpoints saved on one layout resumed on the other.
# - Gradients summed in buckets during the backward (NCCL, beside the backward's kernels) and
#   after it give bit-identical losses (each element is the same sum of two numbers).
# - A 2-GPU run resumed from its own (async, pinned-staged) step-10 checkpoint repeats steps
#   11-20 bit for bit: the staged copy holds step 10's state, not a later step's.
# - 1 GPU vs 2 GPUs: each microbatch is the same computation on the same weights; only the f32
#   gradient sums are added in another order ((g0+g1)+g2)+g3 against (g0+g2)+(g1+g3), a relative
#   change of a few 2^-24. Carried through AdamW and the bf16 weight copies over 20 steps (a copy
#   flips one bf16 ulp, 2^-8, where the f32 weight sat near a rounding boundary), the losses stay
#   far inside the bf16 activation rounding that separates a GPU run from the CPU's (2^-9
#   relative at the first step): the tolerance is 2^-10. A missing or doubled rank's gradient
#   moves the loss by percent within a few steps.
# - Resumes across layouts (1 -> 2 GPUs, 2 -> 1 GPU) track the run they continue within the same
#   tolerance; the 2-GPU checkpoint passes `braid ckpt verify`.
# Usage: train_gpu_dp.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 2 "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20)
run_layout one 0 train.grad_accum=4
run_layout two 2 train.grad_accum=2 checkpoint.async=true parallel.grad_bucket_mb=1
grep -q "layout: 2 ranks" "$work/two.log" || { echo "FAIL: not 2 ranks"; cat "$work/two.log"; exit 1; }
grep -q "gradients: [0-9]* buckets" "$work/two.log" || { echo "FAIL: no buckets"; cat "$work/two.log"; exit 1; }
# Gradient buckets summed during the backward (1 MB: several) against the reduction after it:
# the same two numbers added per element, bit-identical losses.
run_layout two_after 2 train.grad_accum=2 parallel.grad_bucket_mb=0
compare "2 GPUs, gradients summed in buckets during the backward vs after it, losses" \
  "$(losses "$work/two/metrics.jsonl")" "$(losses "$work/two_after/metrics.jsonl")" 0
"$braid" ckpt verify "$work/two/checkpoints/step_00000010" >/dev/null
seed_from two_resumed two 00000010
seed_from one_from_two two 00000010
seed_from two_from_one one 00000010
run_layout two_resumed 2 train.grad_accum=2 checkpoint.resume=true parallel.grad_bucket_mb=1
run_layout one_from_two 0 train.grad_accum=4 checkpoint.resume=true
run_layout two_from_one 2 train.grad_accum=2 checkpoint.resume=true
expect_resumed two_resumed one_from_two two_from_one
tol=0.0009765625
compare_tail "2 GPUs resumed from their step-10 checkpoint vs straight through, losses" two two_resumed 0
compare "2 GPUs resumed from their step-10 checkpoint vs straight through, gradient norms" \
  "$(grad_norms "$work/two/metrics.jsonl" | tail -n 10)" \
  "$(grad_norms "$work/two_resumed/metrics.jsonl" | tail -n 10)" 0
compare "2 GPUs vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/two/metrics.jsonl")" $tol
compare_tail "1 GPU resumed from the 2-GPU checkpoint vs the 2-GPU run, losses" two one_from_two $tol
compare_tail "2 GPUs resumed from the 1-GPU checkpoint vs the 1-GPU run, losses" one two_from_one $tol
echo "multi-GPU training passed"
