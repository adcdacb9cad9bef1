#!/usr/bin/env bash
# A run killed at each point of a save resumes from the previous complete checkpoint and ends
# with the uninterrupted run's final checkpoint, bit for bit. The fault points
# (BRAID_FAULT_SAVE=<point>:2, checkpoint/checkpoint.cpp) end the process during its second save
# (step 8): before the data is written, before its fsync, before the manifest, halfway through
# the manifest, and between the manifest and the commit rename. With an optional MPI launcher,
# the same with two data-parallel ranks (each writes its shard): rank 0 killed before the rename,
# and rank 1 killed before the fsync of its shard.
set -u
braid="$1"
config="$2"
shift 2
mpirun=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
prep_corpus "$braid" "$work" >/dev/null
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=12
      train.seq_len=64 train.micro_batch=4 train.grad_accum=1 optim.warmup=2 train.log_interval=12
      train.eval_interval=12 train.eval_batches=1 model.d_model=64 mlp.ffn=128 moe.ffn=64
      mamba2.head_dim=16 mamba2.chunk=16 checkpoint.interval=4)
digests() { grep -o '"sha256": "[0-9a-f]*"' "$1/checkpoints/step_00000012/manifest.json"; }

# $1: run dir, $2: fault point, then the launcher words.
interrupt_and_resume() {
  local dir=$1 point=$2
  shift 2
  BRAID_FAULT_SAVE="${point%%:*}:2${point#"${point%%:*}"}" "$@" --config "$config" "${args[@]}" train.out_dir="$dir" \
    >"$dir.log" 2>&1
  local status=$?
  [ "$status" -ne 0 ] || fail "$point: the run was not interrupted"
  grep -q "fault injected: save 2 at ${point%%:*}" "$dir.log" || fail "$point: no fault: $(tail -n 3 "$dir.log")"
  [ ! -e "$dir/checkpoints/step_00000008" ] || fail "$point: step 8 was committed"
  "$@" --config "$config" "${args[@]}" train.out_dir="$dir" checkpoint.resume=true \
    >"$dir.resume.log" 2>&1 || fail "$point: resume failed: $(tail -n 3 "$dir.resume.log")"
  grep -q "resumed from .*step_00000004 at step 4" "$dir.resume.log" ||
    fail "$point: did not resume from step 4: $(grep -i resum "$dir.resume.log")"
  diff <(digests "$ref") <(digests "$dir") >/dev/null || fail "$point: final checkpoint differs"
  echo "killed at $point of the step-8 save (status $status): resumed from step 4, final checkpoint identical"
}

ref="$work/ref"
"$braid" train --config "$config" "${args[@]}" train.out_dir="$ref" >"$ref.log" 2>&1 || fail "reference run"
for point in before_data before_fsync before_manifest mid_manifest before_rename; do
  interrupt_and_resume "$work/$point" "$point" "$braid" train
done
if [ "${#mpirun[@]}" -gt 0 ]; then
  ref="$work/ref2"
  "${mpirun[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.out_dir="$ref" \
    >"$ref.log" 2>&1 || fail "2-rank reference run"
  # -x passes the fault switch to the ranks; ":1" kills rank 1 instead of rank 0.
  interrupt_and_resume "$work/mpi" before_rename "${mpirun[@]}" -x BRAID_FAULT_SAVE -np 2 "$braid" train
  interrupt_and_resume "$work/mpi_rank1" before_fsync:1 "${mpirun[@]}" -x BRAID_FAULT_SAVE -np 2 "$braid" train
fi
echo "save interruption passed"
