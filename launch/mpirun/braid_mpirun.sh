#!/usr/bin/env bash
# Braid on one machine with mpirun: NP ranks (one per GPU on a GPU machine), resuming from the
# newest checkpoint, restarted in place the way a SLURM job is requeued: after exit status 3
# (stopped on SIGUSR1 after a save) or 1 (unexpected failure), up to BRAID_MAX_RESTARTS times
# (default 100; the crash-loop guard, exit 4, ends a failing run sooner). SIGUSR1 sent to this
# script reaches every rank (mpirun forwards it); SIGTERM ends the run (status 143).
#
#   launch/mpirun/braid_mpirun.sh NP CONFIG [section.key=value ...]
#
# BRAID names the binary (default: braid on PATH); BRAID_MPIRUN_ARGS adds mpirun options.
set -u
[ $# -ge 2 ] || { echo "usage: launch/mpirun/braid_mpirun.sh NP CONFIG [section.key=value ...]" >&2; exit 2; }
np="$1"
config="$2"
shift 2
export NCCL_NVLS_ENABLE=0
restarts=0
while true; do
  # shellcheck disable=SC2086
  mpirun -np "$np" ${BRAID_MPIRUN_ARGS:-} "${BRAID:-braid}" train --config "$config" \
    checkpoint.resume=true "$@" &
  pid=$!
  trap 'kill -USR1 "$pid"' USR1
  trap 'kill -TERM "$pid"; wait "$pid"; exit 143' TERM
  while true; do
    wait "$pid"
    status=$?
    if [ "$status" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$status" -ne 1 ] && [ "$status" -ne 3 ]; then exit "$status"; fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "${BRAID_MAX_RESTARTS:-100}" ]; then
    echo "braid_mpirun: $restarts restarts, giving up (exit status $status)" >&2
    exit "$status"
  fi
  echo "braid_mpirun: exit status $status: restarting from the newest checkpoint ($restarts)"
done
