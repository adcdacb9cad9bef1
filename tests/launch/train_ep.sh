#!/usr/bin/env bash
# Expert parallelism end to end: `braid train` on one process and with the tiny hybrid's 4
# experts split over ep ranks (each holds E/ep experts; tokens reach them by all-to-all-v): ep=2
# (2 ranks), ep=4 (4 ranks), ep=2 x dp=4 (4 ranks: two ranks hold each expert, whose ZeRO-1 state
# is sharded over them) and ep=2 x tp=2 (4 ranks: the experts also split over tp); micro_batch
# scaled so the global batches are the same. The losses agree step by step. Resumes across
# layouts: ep=2 x dp=4 from the one-process step-4 checkpoint, one process from the ep=2 x dp=4
# one, and ep=4 from the ep=2 x tp=2 one, with the same losses; the sharded checkpoint verifies.
# Usage: train_ep.sh BRAID CONFIG MPIRUN...
# Tolerance: the layouts differ only in how f32 sums are associated (gradients summed over up to
# 4 ranks in another order: within 4 2^-24 ~ 2.4e-7 per element), routing is dropless (no
# capacity: no token is routed differently) and the auxiliary losses are off (each rank would
# compute them over its own tokens). The gradient norms (f64 sums of those elements) then agree
# within 1e-6 relative; Adam's steps of lr <= 3e-3 move the weights by that relative change times
# lr, so the losses agree within 1e-7 (measured: norms 1e-7 to 2e-7, losses about 2e-9). These
# are tighter than the other layout tests' 1e-4 because frozen experts (their gradients never
# summed) change the losses by only 1.4e-6 over 8 steps, and an expert norm not summed over the
# ep ranks changes the norms by 1.9e-6: both fail here.
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_layout_test "$@"
layout_args "$work"
run_layout a 0 train.micro_batch=4
run_layout b 2 train.micro_batch=2 parallel.ep=2
run_layout c 4 train.micro_batch=1 parallel.ep=4
run_layout d 4 train.micro_batch=1 parallel.ep=2
run_layout e 4 train.micro_batch=2 parallel.ep=2 parallel.tp=2 parallel.etp=2
grep -q "layout: 4 ranks, tp 1, cp 1, dp 4, ep 2 (expert data parallel 2)" "$work/d.log" ||
  { echo "FAIL: d is not ep=2 x edp=2"; cat "$work/d.log"; exit 1; }
# Each ep=4 rank holds one of the 4 experts: 3/4 of the expert weights fewer than one process.
held() { sed -n 's/^model: pattern [^,]*, \([0-9]*\) parameters.*/\1/p' "$1"; }
pa=$(held "$work/a.log") pc=$(held "$work/c.log")
experts=$((3 * 64 * 64 * 4))  # gate, up, down of d_model 64 x moe.ffn 64, 4 experts
[ "$((pa - pc))" -eq "$((experts * 3 / 4))" ] ||
  { echo "FAIL: an ep=4 rank holds $pc parameters, one process $pa"; exit 1; }
echo "parameters held: one process $pa, an ep=4 rank $pc"
check "ep=2 vs one process" b
check "ep=4 vs one process" c
check "ep=2 x dp=4 vs one process" d
check "ep=2 x tp=2 vs one process" e
"$braid" ckpt verify "$work/d/checkpoints/step_00000008" >/dev/null ||
  { echo "FAIL: the ep=2 x dp=4 checkpoint does not verify"; exit 1; }
mkdir -p "$work/f/checkpoints" "$work/g/checkpoints" "$work/h/checkpoints"
cp -r "$work/a/checkpoints/step_00000004" "$work/f/checkpoints/"
cp -r "$work/d/checkpoints/step_00000004" "$work/g/checkpoints/"
cp -r "$work/e/checkpoints/step_00000004" "$work/h/checkpoints/"
run_layout f 4 train.micro_batch=1 parallel.ep=2 checkpoint.resume=true
run_layout g 0 train.micro_batch=4 checkpoint.resume=true
run_layout h 4 train.micro_batch=1 parallel.ep=4 checkpoint.resume=true
for r in f g h; do
  grep -q "resumed from .*step_00000004 at step 4" "$work/$r.log" ||
    { echo "FAIL: $r did not resume"; cat "$work/$r.log"; exit 1; }
done
check "ep=2 x dp=4 resumed from a 1-process checkpoint" f 4
check "1 process resumed from an ep=2 x dp=4 checkpoint" g 4
check "ep=4 resumed from an ep=2 x tp=2 checkpoint" h 4
# The auxiliary losses on, and the same microbatches on both layouts (one process: 2
# microbatches of 2 samples; ep=2: one of 2 on each rank): each microbatch's auxiliary gradient
# counts once in the step's sum over the ranks, so the losses agree as tightly as above. (A
# gradient scaled per rank rather than per global batch counted them dp times: 5e-4 apart.)
aux=(moe.aux_loss_coef=0.01 moe.z_loss_coef=0.001 train.micro_batch=2)
run_layout i 0 "${aux[@]}" train.grad_accum=2
run_layout j 2 "${aux[@]}" train.grad_accum=1 parallel.ep=2
compare "ep=2 vs one process with the auxiliary losses, losses" \
  "$(losses "$work/i/metrics.jsonl")" "$(losses "$work/j/metrics.jsonl")" 1e-7
compare "ep=2 vs one process with the auxiliary losses, gradient norms" \
  "$(grad_norms "$work/i/metrics.jsonl")" "$(grad_norms "$work/j/metrics.jsonl")" 1e-6
echo "expert-parallel training passed"
