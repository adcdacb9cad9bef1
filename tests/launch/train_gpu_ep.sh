#!/usr/bin/env bash
# Expert parallelism on GPUs (a machine with 2 or more GPUs only): the tiny GPU hybrid with two
# MoE layers (4 experts, top-2, softmax router with the auxiliary and z-losses) on one GPU with
# train.grad_accum=4 against ep=2 on 2 GPUs (each holds 2 experts; token rows reach them by an
# NCCL all-to-all; dense weights data parallel over the 2 ranks) with grad_accum=2: the same
# microbatches, each routed on the rank that reads it, as on one GPU.
# - ep=2 resumed from its own step-10 checkpoint repeats steps 11-20 bit for bit.
# - ep=2 vs 1 GPU: each token's expert outputs are the same products (the expert GEMMs run over
#   the rows of both ranks, one row's result independent of the others'); the weight gradients are
#   f32 sums in another order, as in train_gpu_dp.sh (there: 2.2e-4 over 20 steps, tolerance
#   2^-10). The bf16 weight copies, once they differ by an ulp, can also move a token whose K-th
#   and (K+1)-th router scores lie within that rounding to another expert: that token's loss
#   changes by O(1) nat, the step's mean over 8192 tokens by about 1e-4 relative per such token.
#   Tolerance 2^-8 (3.9e-3): a few such tokens; an expert whose gradient is lost or doubled moves
#   the loss by percent within a few steps.
# - Resumes 1 GPU -> ep=2 and ep=2 -> 1 GPU track the runs they continue within the same
#   tolerance; the ep=2 checkpoint passes `braid ckpt verify`.
# Usage: train_gpu_ep.sh BRAID CONFIG (configs/tiny_gpu.yaml) MPIRUN...
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_gpu_layout_test 2 "$@"
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=20
      checkpoint.interval=10 train.log_interval=5 train.eval_interval=20 model.pattern=M*EME
      moe.experts=4 moe.top_k=2 moe.ffn=256 moe.aux_loss_coef=0.01 moe.z_loss_coef=0.001)
run_layout one 0 train.grad_accum=4
run_layout ep 2 train.grad_accum=2 parallel.ep=2
grep -q "layout: 2 ranks, tp 1, cp 1, dp 2, ep 2 (expert data parallel 1)" "$work/ep.log" ||
  { echo "FAIL: not ep=2"; cat "$work/ep.log"; exit 1; }
tol=0.00390625
compare "ep=2 vs 1 GPU, losses" "$(losses "$work/one/metrics.jsonl")" \
  "$(losses "$work/ep/metrics.jsonl")" $tol
one_args=(train.grad_accum=4)
resume_across ep 2 $tol train.grad_accum=2 parallel.ep=2
echo "expert-parallel GPU training passed"
