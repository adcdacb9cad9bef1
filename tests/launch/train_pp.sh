#!/usr/bin/env bash
# Pipeline parallelism end to end: `braid train` on one process and with the tiny hybrid's 7
# layers cut into pipeline stages, 1F1B over the step's microbatches (each stage before the last
# recomputes a microbatch's forward before its backward; the tied embedding table lives on the
# first stage and, mirrored, on the last, their gradients summed): pp=2 (2 ranks), pp=4, pp=2 x
# dp=2, pp=2 x tp=2, pp=2 x cp=2, pp=2 x ep=2 (4 ranks), pp=2 x tp=2 x dp=2 with sequence
# parallelism (8 ranks), and interleaved (2 chunks per stage: pp=2, pp=2 x dp=2), with the same
# global batches; cuts measured, from the pattern's '|' and
# given by parallel.stage_starts. The losses and gradient norms agree step by step. Resumes
# across layouts: pp=2 from the one-process step-4 checkpoint, one process from the pp=2 x dp=2
# one, pp=2 x dp=2 from a pp=2 one (keeping its cuts); the sharded checkpoint verifies.
# Usage: train_pp.sh BRAID CONFIG MPIRUN...
# Tolerance: as in train_ep.sh (the same derivation): the layouts differ only in how f32 sums
# are associated (the tied table's two gradient parts, the data-parallel sums), so losses agree
# within 1e-7 relative and gradient norms within 1e-6.
set -eu
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
start_layout_test "$@"
layout_args "$work"
run_layout a 0 train.micro_batch=4 train.grad_accum=2
run_layout b 2 train.micro_batch=4 train.grad_accum=2 parallel.pp=2
run_layout c 4 train.micro_batch=2 train.grad_accum=2 parallel.pp=2
run_layout d 4 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 parallel.tp=2 parallel.etp=2
run_layout e 4 train.micro_batch=2 train.grad_accum=4 parallel.pp=4
run_layout x 4 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 parallel.cp=2
run_layout y 4 train.micro_batch=2 train.grad_accum=2 parallel.pp=2 parallel.ep=2
run_layout z 8 train.micro_batch=2 train.grad_accum=2 parallel.pp=2 parallel.tp=2 parallel.etp=2 \
  parallel.sequence_parallel=true
# Interleaved: 2 chunks per stage (4 pieces of the 7 layers, piece c pp + s on stage s).
run_layout v 2 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 parallel.virtual_stages=2
run_layout w 4 train.micro_batch=2 train.grad_accum=2 parallel.pp=2 parallel.virtual_stages=2
grep -q "pipeline: 2 stages x 2 chunks, first layers 0,[0-9],[0-9],[0-9]" "$work/v.log" ||
  { echo "FAIL: v is not interleaved"; cat "$work/v.log"; exit 1; }
# Cuts from the pattern's '|' (layers 0-2 | 3-6) and given explicitly.
run_layout p 2 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 'model.pattern=S-M|*E-M'
run_layout q 2 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 parallel.stage_starts=0,5
grep -q "pipeline: 2 stages x 1 chunks, first layers 0,3" "$work/p.log" ||
  { echo "FAIL: the pattern's cut is not used"; cat "$work/p.log"; exit 1; }
grep -q "pipeline: 2 stages x 1 chunks, first layers 0,5" "$work/q.log" ||
  { echo "FAIL: parallel.stage_starts is not used"; cat "$work/q.log"; exit 1; }
grep -q "pipeline: measured ms per layer" "$work/b.log" ||
  { echo "FAIL: b did not measure its cuts"; cat "$work/b.log"; exit 1; }
grep -q "layout: 4 ranks, tp 1, cp 1, dp 2, ep 1 (expert data parallel 2), pp 2" "$work/c.log" ||
  { echo "FAIL: c is not pp=2 x dp=2"; cat "$work/c.log"; exit 1; }
check "pp=2 vs one process" b
check "pp=2 x dp=2 vs one process" c
check "pp=2 x tp=2 vs one process" d
check "pp=4 vs one process" e
check "pp=2 x cp=2 vs one process" x
check "pp=2 x ep=2 vs one process" y
check "pp=2 x tp=2 x dp=2 with sequence parallelism vs one process" z
check "pp=2 interleaved (2 chunks per stage) vs one process" v
check "pp=2 x dp=2 interleaved vs one process" w
check "pp=2 cut by the pattern vs one process" p
check "pp=2 cut at layer 5 vs one process" q
"$braid" ckpt verify "$work/c/checkpoints/step_00000008" >/dev/null ||
  { echo "FAIL: the pp=2 x dp=2 checkpoint does not verify"; exit 1; }
mkdir -p "$work/f/checkpoints" "$work/g/checkpoints" "$work/h/checkpoints" "$work/i/checkpoints"
cp -r "$work/w/checkpoints/step_00000004" "$work/i/checkpoints/"
cp -r "$work/a/checkpoints/step_00000004" "$work/f/checkpoints/"
cp -r "$work/c/checkpoints/step_00000004" "$work/g/checkpoints/"
cp -r "$work/q/checkpoints/step_00000004" "$work/h/checkpoints/"
run_layout f 2 train.micro_batch=4 train.grad_accum=2 parallel.pp=2 checkpoint.resume=true
run_layout g 0 train.micro_batch=4 train.grad_accum=2 checkpoint.resume=true
run_layout h 4 train.micro_batch=2 train.grad_accum=2 parallel.pp=2 checkpoint.resume=true
run_layout i 0 train.micro_batch=4 train.grad_accum=2 checkpoint.resume=true
# h resumes q's pipeline (pp = 2) and keeps its cuts instead of measuring.
grep -q "pipeline: 2 stages x 1 chunks, first layers 0,5" "$work/h.log" ||
  { echo "FAIL: h did not keep the checkpoint's cuts"; cat "$work/h.log"; exit 1; }
for r in f g h i; do
  grep -q "resumed from .*step_00000004 at step 4" "$work/$r.log" ||
    { echo "FAIL: $r did not resume"; cat "$work/$r.log"; exit 1; }
done
check "pp=2 resumed from a 1-process checkpoint" f 4
check "1 process resumed from a pp=2 x dp=2 checkpoint" g 4
check "pp=2 x dp=2 resumed from a pp=2 checkpoint" h 4
check "1 process resumed from an interleaved pp=2 x dp=2 checkpoint" i 4
echo "pipeline-parallel training passed"
