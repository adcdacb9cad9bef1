#!/usr/bin/env bash
# Job control of `braid train` (launch/job_control.h), on a tiny model:
#  1. SIGUSR1 to a single process: it stops at the next step boundary, saves, exits 3; resuming
#     gives the uninterrupted run's losses and final checkpoint bit for bit.
#  2. SIGUSR1 to rank 1 of two MPI ranks: both ranks agree, save once, exit 3; resuming gives the
#     uninterrupted 2-rank run's losses and final checkpoint bit for bit. The same through
#     launch/mpirun/braid_mpirun.sh, which restarts the run in place and finishes it.
#  3. SIGTERM: exits at once with 143; the newest committed checkpoint still resumes.
#  4. Crash loop: runs killed (SIGKILL) before committing a newer checkpoint; with
#     checkpoint.max_attempts=2 the third start refuses with exit 4 and says why.
set -u
braid="$1"
config="$2"
shift 2
mpirun=("$@")  # the MPI launcher and its options (empty: skip part 2)
work=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
prep_corpus "$braid" "$work" >/dev/null
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=40
      train.seq_len=64 train.micro_batch=4 train.grad_accum=1 optim.warmup=2 train.log_interval=10
      train.eval_interval=40 train.eval_batches=1 model.d_model=64 mlp.ffn=128 moe.ffn=64
      mamba2.head_dim=16 mamba2.chunk=16 checkpoint.interval=1000)
train_losses() { grep '"kind": "train"' "$1" | grep -o '"step": [^,]*, "loss": [^,]*'; }
digests() { grep -o '"sha256": "[0-9a-f]*"' "$1"/checkpoints/step_00000040/manifest.json; }
# Waits until run dir $1 has logged at least one step.
wait_first_step() {
  for _ in $(seq 1 600); do
    [ -s "$1/metrics.jsonl" ] && grep -q '"kind": "train"' "$1/metrics.jsonl" && return 0
    sleep 0.05
  done
  fail "no step logged in $1"
}
# Once run dir $1 has logged a step, sends signal $2 to process $3 and waits for it; its exit
# status is left in $status.
signal_after_first_step() {
  wait_first_step "$1"
  kill "-$2" "$3"
  wait "$3"
  status=$?
}
# Resumes run dir $1 to the end with the command "${@:4}" and checks its last $2 losses and its
# final checkpoint against the uninterrupted run in $3.
resume_and_compare() {
  "${@:4}" --config "$config" "${args[@]}" train.out_dir="$1" checkpoint.resume=true >"$1/resume.log" 2>&1 ||
    fail "resume of $1 failed: $(tail -n 3 "$1/resume.log")"
  diff <(train_losses "$3/metrics.jsonl" | tail -n "$2") <(train_losses "$1/metrics.jsonl" | tail -n "$2") >/dev/null ||
    fail "$1: losses after the resume differ from the uninterrupted run"
  diff <(digests "$3") <(digests "$1") >/dev/null || fail "$1: final checkpoint differs"
}

"$braid" train --config "$config" "${args[@]}" train.out_dir="$work/ref" >"$work/ref.log" 2>&1 ||
  fail "reference run: $(tail -n 3 "$work/ref.log")"

# 1. SIGUSR1, one process.
"$braid" train --config "$config" "${args[@]}" train.out_dir="$work/usr1" >"$work/usr1.log" 2>&1 &
signal_after_first_step "$work/usr1" USR1 $!
[ "$status" -eq 3 ] || fail "SIGUSR1: exit status $status, expected 3: $(tail -n 3 "$work/usr1.log")"
stopped=$(sed -n 's/.*stopped on SIGUSR1 after step \([0-9]*\).*/\1/p' "$work/usr1.log")
{ [ -n "$stopped" ] && [ "$stopped" -lt 40 ]; } || fail "SIGUSR1: no stop line"
[ -f "$work/usr1/checkpoints/step_$(printf %08d "$stopped")/manifest.json" ] ||
  fail "SIGUSR1: no committed checkpoint at step $stopped"
[ ! -e "$work/usr1/checkpoints/attempts.json" ] || fail "SIGUSR1: attempts record left behind"
usr1_stop=$(printf %08d "$stopped")
resume_and_compare "$work/usr1" $((40 - stopped)) "$work/ref" "$braid" train
echo "SIGUSR1 (1 process): stopped after step $stopped with status 3, resumed exactly"

# 2. SIGUSR1 to rank 1 of 2.
if [ "${#mpirun[@]}" -gt 0 ]; then
  "${mpirun[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.out_dir="$work/mpi_ref" \
    >"$work/mpi_ref.log" 2>&1 || fail "2-rank reference run: $(tail -n 3 "$work/mpi_ref.log")"
  "${mpirun[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.out_dir="$work/mpi" \
    >"$work/mpi.log" 2>&1 &
  mpid=$!
  wait_first_step "$work/mpi"
  rank1=""
  for p in $(pgrep -f "train.out_dir=$work/mpi"); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1" && rank1=$p
  done
  [ -n "$rank1" ] || fail "MPI: rank 1 not found"
  kill -USR1 "$rank1"
  wait "$mpid"
  status=$?
  [ "$status" -eq 3 ] || fail "MPI SIGUSR1: exit status $status, expected 3: $(tail -n 5 "$work/mpi.log")"
  stopped=$(sed -n 's/.*stopped on SIGUSR1 after step \([0-9]*\).*/\1/p' "$work/mpi.log")
  [ "$(grep -c "saved checkpoint" "$work/mpi.log")" -eq 1 ] || fail "MPI SIGUSR1: expected one save"
  resume_and_compare "$work/mpi" $((40 - stopped)) "$work/mpi_ref" "${mpirun[@]}" -np 2 "$braid" train
  echo "SIGUSR1 (rank 1 of 2): both ranks stopped after step $stopped, status 3, resumed exactly"
  # The mpirun launcher restarts the run in place after the signal-driven stop.
  launcher="$(dirname "$0")/../../launch/mpirun/braid_mpirun.sh"
  BRAID="$braid" BRAID_MPIRUN_ARGS="${mpirun[*]:1}" "$launcher" 2 "$config" "${args[@]}" \
    train.out_dir="$work/launcher" >"$work/launcher.log" 2>&1 &
  signal_after_first_step "$work/launcher" USR1 $!
  [ "$status" -eq 0 ] || fail "braid_mpirun.sh: exit status $status: $(tail -n 5 "$work/launcher.log")"
  grep -q "restarting from the newest checkpoint (1)" "$work/launcher.log" ||
    fail "braid_mpirun.sh: no restart"
  diff <(digests "$work/mpi_ref") <(digests "$work/launcher") >/dev/null ||
    fail "braid_mpirun.sh: final checkpoint differs from the uninterrupted run"
  echo "braid_mpirun.sh: SIGUSR1 -> save, exit 3, restart, finished equal to the uninterrupted run"
fi

# 3. SIGTERM: prompt exit; the committed checkpoint before it still resumes.
mkdir -p "$work/term/checkpoints"
cp -r "$work/usr1/checkpoints/step_$usr1_stop" "$work/term/checkpoints/"
"$braid" train --config "$config" "${args[@]}" train.out_dir="$work/term" checkpoint.resume=true \
  >"$work/term.log" 2>&1 &
pid=$!
wait_first_step "$work/term"
t0=$(date +%s%N)
kill -TERM "$pid"
wait "$pid"
status=$?
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$status" -eq 143 ] || fail "SIGTERM: exit status $status, expected 143"
[ "$ms" -lt 2000 ] || fail "SIGTERM: took $ms ms to exit"
"$braid" train --config "$config" "${args[@]}" train.out_dir="$work/term" checkpoint.resume=true \
  >"$work/term2.log" 2>&1 || fail "resume after SIGTERM failed: $(tail -n 3 "$work/term2.log")"
echo "SIGTERM: status 143 after $ms ms; the run resumed from its last committed checkpoint"

# 4. Crash loop: two runs die (SIGKILL) without committing; the third start is refused.
for attempt in 1 2; do
  "$braid" train --config "$config" "${args[@]}" train.out_dir="$work/loop" checkpoint.resume=true \
    checkpoint.max_attempts=2 >"$work/loop$attempt.log" 2>&1 &
  pid=$!
  wait_first_step "$work/loop"
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null
  rm -f "$work/loop/metrics.jsonl"
done
"$braid" train --config "$config" "${args[@]}" train.out_dir="$work/loop" checkpoint.resume=true \
  checkpoint.max_attempts=2 >"$work/loop3.log" 2>&1
status=$?
[ "$status" -eq 4 ] || fail "crash loop: exit status $status, expected 4: $(tail -n 3 "$work/loop3.log")"
grep -q "crash loop: 2 runs in a row started from step 0" "$work/loop3.log" ||
  fail "crash loop: message: $(tail -n 2 "$work/loop3.log")"
echo "crash loop: the third start after two killed runs exited 4: $(grep -o 'crash loop:.*' "$work/loop3.log" | cut -c1-80)"
echo "job control passed"
