#!/usr/bin/env bash
# A collective that cannot finish (rank 0 never reaches the barrier) ends the job with a message
# naming the rank, the group and the operation, instead of hanging.
set -u
mpirun_cmd=("$@")
out=$(BRAID_COMM_TIMEOUT_S=2 timeout 60 "${mpirun_cmd[@]}" --hang 2>&1)
rc=$?
echo "$out" | grep "braid: error" | head -n 3
if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then echo "FAIL: exit $rc (expected the watchdog to abort)"; exit 1; fi
echo "$out" | grep -q "group 'world' (rank 1 of 2): barrier did not finish within 2 s" ||
  { echo "FAIL: no watchdog message"; echo "$out" | tail -n 20; exit 1; }
echo "watchdog ended the stuck job (exit $rc)"
