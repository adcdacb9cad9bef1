# shellcheck shell=bash
# Sourced by the launch test scripts: prep_corpus BRAID WORK prepares a small corpus (the Python
# standard library's modules a*-c*) with `braid prep` into WORK/data/{train,valid}.tok;
# losses METRICS prints a run's training losses, one per step (grad_norms: the gradient norms);
# compare NAME A B [TOL] checks two lists agree pairwise within TOL relative (default 1e-4, the
# layout tests' tolerance);
# start_layout_test BRAID CONFIG MPIRUN... sets braid, config, mpirun_cmd and a temporary work
# directory (removed on exit) holding the prepared corpus; check (below) compares a run with run a;
# layout_args WORK sets `args`, the layout tests' small run (8 steps of the tiny hybrid, MoE
# auxiliary losses off); run_layout OUT RANKS ARGS... runs it into WORK/OUT (RANKS 0: one process,
# else through mpirun_cmd), its output in WORK/OUT.log; seed_from RUN FROM STEP copies run FROM's
# checkpoint of STEP (8 digits) into run RUN's, for RUN to resume from; expect_resumed RUN...
# checks that each run resumed from its step-10 checkpoint; compare_tail NAME A B TOL compares
# the last 10 losses of runs A and B; skip_without_gpus N exits 77 (skipped) unless N GPUs are
# visible; start_gpu_layout_test N ... starts a multi-GPU script.
prep_corpus() {
  local braid=$1 work=$2 python_dir=""
  for d in /usr/lib/python3.*/; do
    python_dir=$d
    break
  done
  mkdir -p "$work/src"
  for f in "$python_dir"[a-c]*.py; do cp "$f" "$work/src/"; done
  "$braid" prep --input "$work/src" --ext .py --out "$work/data" --valid-fraction 0.2
}
losses() { grep '"kind": "train"' "$1" | sed 's/.*"loss": \([^,]*\),.*/\1/'; }
grad_norms() { grep '"kind": "train"' "$1" | sed 's/.*"grad_norm": \([^,]*\),.*/\1/'; }
compare() {
  paste <(echo "$2") <(echo "$3") | awk -v name="$1" -v tol="${4:-1e-4}" '{
      d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > worst) worst = r; n++ }
    END { printf "%s: %d steps, largest relative difference %.2e (tolerance %s)\n", name, n, worst, tol; exit !(n > 0 && worst <= tol) }'
}
# check NAME RUN [N]: run RUN's last N (default 8) losses and gradient norms against run a's, at
# the tight tolerances of train_ep.sh (losses 1e-7, norms 1e-6 relative).
check() {
  local name=$1 run=$2 n=${3:-8}
  compare "$name, losses" "$(losses "$work/a/metrics.jsonl" | tail -n "$n")" \
    "$(losses "$work/$run/metrics.jsonl" | tail -n "$n")" 1e-7
  compare "$name, gradient norms" "$(grad_norms "$work/a/metrics.jsonl" | tail -n "$n")" \
    "$(grad_norms "$work/$run/metrics.jsonl" | tail -n "$n")" 1e-6
}
start_layout_test() {
  braid="$1"
  config="$2"
  shift 2
  mpirun_cmd=("$@")
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  prep_corpus "$braid" "$work" >/dev/null
}
layout_args() {
  local work=$1
  args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=8
        train.seq_len=64 optim.warmup=2 optim.eps=0.001 train.log_interval=4 train.eval_interval=8
        train.eval_batches=2 model.d_model=64 mlp.ffn=128 moe.ffn=64 moe.aux_loss_coef=0
        moe.z_loss_coef=0 mamba2.head_dim=16 mamba2.groups=2 mamba2.chunk=16
        checkpoint.interval=4 train.threads=1)
}
run_layout() {
  local out="$1" np="$2"
  shift 2
  if [ "$np" -eq 0 ]; then
    "$braid" train --config "$config" "${args[@]}" train.out_dir="$work/$out" "$@" >"$work/$out.log"
  else
    "${mpirun_cmd[@]}" -np "$np" "$braid" train --config "$config" "${args[@]}" \
      train.out_dir="$work/$out" "$@" >"$work/$out.log"
  fi
}
# expect_resumed RUN...: each run's log says it resumed from its step-10 checkpoint.
expect_resumed() {
  local r
  for r in "$@"; do
    grep -q "resumed from .*step_00000010 at step 10" "$work/$r.log" ||
      { echo "FAIL: $r did not resume"; cat "$work/$r.log"; exit 1; }
  done
}
# resume_across RUN NP TOL ARGS...: the resumes around run RUN (NP ranks, ARGS) and run one (one
# process, the array one_args): RUN's step-10 checkpoint verifies; RUN resumed from it repeats its
# last 10 losses exactly; one process resumed from it tracks RUN, and RUN's layout resumed from
# one's step-10 checkpoint tracks one, within TOL (relative).
# shellcheck disable=SC2154 # one_args: set by the calling script
resume_across() {
  local run=$1 np=$2 tol=$3
  shift 3
  "$braid" ckpt verify "$work/$run/checkpoints/step_00000010" >/dev/null
  seed_from "${run}_resumed" "$run" 00000010
  seed_from "one_from_$run" "$run" 00000010
  seed_from "${run}_from_one" one 00000010
  run_layout "${run}_resumed" "$np" "$@" checkpoint.resume=true
  run_layout "one_from_$run" 0 ${one_args[@]+"${one_args[@]}"} checkpoint.resume=true
  run_layout "${run}_from_one" "$np" "$@" checkpoint.resume=true
  expect_resumed "${run}_resumed" "one_from_$run" "${run}_from_one"
  compare_tail "$run resumed from its step-10 checkpoint vs straight through, losses" "$run" \
    "${run}_resumed" 0
  compare_tail "1 GPU resumed from the $run checkpoint vs the $run run, losses" "$run" \
    "one_from_$run" "$tol"
  compare_tail "$run resumed from the 1-GPU checkpoint vs the 1-GPU run, losses" one \
    "${run}_from_one" "$tol"
}
# compare_tail NAME A B TOL: the last 10 losses of runs A and B.
compare_tail() {
  compare "$1" "$(losses "$work/$2/metrics.jsonl" | tail -n 10)" \
    "$(losses "$work/$3/metrics.jsonl" | tail -n 10)" "$4"
}
seed_from() {
  mkdir -p "$work/$1/checkpoints"
  cp -r "$work/$2/checkpoints/step_$3" "$work/$1/checkpoints/"
}
# start_gpu_layout_test N BRAID CONFIG MPIRUN...: a multi-GPU script's start: skipped unless N
# GPUs are visible, then start_layout_test, with NVLink multicast off in NCCL.
start_gpu_layout_test() {
  skip_without_gpus "$1"
  shift
  start_layout_test "$@"
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
}
skip_without_gpus() {
  local n
  n=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  if [ "${n:-0}" -lt "$1" ]; then
    echo "fewer than $1 GPU(s) visible: $(basename "$0") skipped"
    exit 77
  fi
}
