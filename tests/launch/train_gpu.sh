#!/usr/bin/env bash
# Training on one GPU end to end (a GPU machine only): the tiny GPU hybrid (Mamba-2, attention,
# MLP) for 20 steps with train.device=cuda and with train.device=cpu, and the GPU run's step-10
# checkpoint resumed on the GPU and on the CPU.
# - The GPU run resumed from its own checkpoint repeats its steps 11-20 bit for bit (same
#   kernels, same order: deterministic).
# - GPU (bf16 activations and weight copies, f32 parameters, gradients and Adam state) against
#   CPU (f32 throughout): each step's loss within 2^-5 relative. The bf16 rounding of every stored
#   activation (2^-9 relative) moves a loss by about 2^-9 at the first step; over 20 Adam steps
#   at lr 3e-3 the two weight trajectories drift apart, measured at up to ~1% on an H100
#   (2026-11-22); a wrong gradient or a missing term diverges by far more within 20 steps.
# - The GPU checkpoint resumed on the CPU tracks the GPU run within the same tolerance (the
#   checkpoint holds f32 parameters and Adam state: either device reads it).
# - GPU in f32 (train.precision=fp32: every op's f32 path) against the CPU: only the order of f32
#   sums differs (the first step's loss within 2^-16, test_model_gpu); an Adam step normalises
#   each gradient element, so a relative gradient difference of 2^-13 moves a weight by at most
#   2^-13 lr per step: 20 steps at lr 3e-3 move the weights by < 1e-5 and the losses by far less
#   than 2^-12, the tolerance (128 times tighter than the bf16 run's).
# Usage: train_gpu.sh BRAID CONFIG (configs/tiny_gpu.yaml)
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
skip_without_gpus 1
start_layout_test "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20)
run_layout gpu 0
run_layout cpu 0 train.device=cpu
run_layout gpu_fp32 0 train.precision=fp32
for r in gpu_resumed cpu_resumed; do seed_from "$r" gpu 00000010; done
run_layout gpu_resumed 0 checkpoint.resume=true
run_layout cpu_resumed 0 checkpoint.resume=true train.device=cpu
expect_resumed gpu_resumed cpu_resumed
compare_tail "GPU resumed from its step-10 checkpoint vs straight through, losses" gpu gpu_resumed 0
compare "GPU resumed from its step-10 checkpoint vs straight through, gradient norms" \
  "$(grad_norms "$work/gpu/metrics.jsonl" | tail -n 10)" \
  "$(grad_norms "$work/gpu_resumed/metrics.jsonl" | tail -n 10)" 0
compare "GPU (mixed precision) vs CPU (f32), losses" "$(losses "$work/gpu/metrics.jsonl")" \
  "$(losses "$work/cpu/metrics.jsonl")" 0.03125
compare "GPU in f32 vs CPU (f32), losses" "$(losses "$work/gpu_fp32/metrics.jsonl")" \
  "$(losses "$work/cpu/metrics.jsonl")" 0.000244140625
compare_tail "GPU checkpoint resumed on the CPU vs the GPU run, losses" gpu cpu_resumed 0.03125
echo "GPU training passed"
