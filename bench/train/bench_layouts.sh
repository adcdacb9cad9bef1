#!/usr/bin/env bash
# Throughput of training layouts side by side, as one JSON record: each run trains CONFIG for
# STEPS steps (one process, or NP ranks under mpirun; a cosine schedule without warmup, no
# checkpoint or evaluation, whatever the config says) and is summarised by the medians of its
# steps 4 .. STEPS-1 (2 .. STEPS-1 for fewer than 6 steps) from metrics.jsonl: tokens/s, MFU,
# the blocking and device-ordered communication time, the pipeline bubble and its theory, with
# every step's seconds (the same seed gives every run the same batches, so runs of one sequence
# length can be compared step by step) and the run's layout and memory lines.
#
#   bench/train/bench_layouts.sh OUT.json CONFIG "NAME NP [section.key=value ...]" ...
#
# e.g. cp=4 at 131,072 tokens against one GPU at 32,768 (issue 8):
#   bench/train/bench_layouts.sh bench/results/x.json configs/hybrid_1b.yaml \
#     "cp1_32k 1 train.seq_len=32768" "cp4_131k 4 train.seq_len=131072 parallel.cp=4"
# Environment: BRAID (default build-gpu/launch/braid), MPIRUN (default mpirun --oversubscribe
# --bind-to none), STEPS (default 10), COMMON (overrides added to every run, e.g. the data
# paths), BRAID_COMMIT (the commit to record, where the checkout's git metadata is not the tree's,
# as on a copied working tree). A run that fails is recorded with its exit status and the end of
# its log.
set -u
[ $# -ge 3 ] || { echo "usage: bench_layouts.sh OUT.json CONFIG \"NAME NP [overrides]\" ..." >&2; exit 2; }
out="$1"
config="$2"
shift 2
braid="${BRAID:-build-gpu/launch/braid}"
mpirun_cmd="${MPIRUN:-mpirun --oversubscribe --bind-to none}"
steps="${STEPS:-10}"
export NCCL_NVLS_ENABLE=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fixed=(train.log_interval=1 train.eval_interval=100000 train.eval_batches=1
       checkpoint.save_final=false optim.schedule=cosine optim.warmup=0 "train.steps=$steps")
runs=()
for spec in "$@"; do
  read -r -a words <<<"$spec"
  name="${words[0]}"
  np="${words[1]}"
  overrides=("${fixed[@]}" ${COMMON:-} "${words[@]:2}" "train.out_dir=$work/$name")
  cmd=("$braid" train --config "$config" "${overrides[@]}")
  # shellcheck disable=SC2206
  [ "$np" -gt 1 ] && cmd=($mpirun_cmd -np "$np" "${cmd[@]}")
  echo "bench_layouts: $name: ${cmd[*]}" >&2
  "${cmd[@]}" >"$work/$name.log" 2>&1
  echo "$?" >"$work/$name.rc"
  printf '%s\n' "${cmd[*]}" >"$work/$name.cmd"
  runs+=("$name")
done
commit=${BRAID_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
device=$(nvidia-smi -L 2>/dev/null | tr '\n' ';' || true)
[ -n "$device" ] || device="cpu: $(nproc) cores"
python3 - "$out" "$work" "$config" "$commit" "$device" "$steps" "${runs[@]}" <<'PY'
import json, os, statistics, sys, datetime
out, work, config, commit, device, steps = sys.argv[1:7]
names = sys.argv[7:]
steps = int(steps)
lo = 4 if steps >= 6 else 2
record = {"what": "bench/train/bench_layouts.sh: training layouts side by side",
          "date": datetime.date.today().isoformat(), "commit": commit, "device": device,
          "config": config, "window": f"medians of steps {lo} to {steps - 1}", "runs": []}
for name in names:
    run = {"name": name, "command": open(os.path.join(work, name + ".cmd")).read().strip(),
           "exit": int(open(os.path.join(work, name + ".rc")).read())}
    log = open(os.path.join(work, name + ".log"), errors="replace").read().splitlines()
    run["layout"] = [l for l in log
                     if l.startswith(("layout:", "pipeline:", "GPU memory:", "memory:"))]
    path = os.path.join(work, name, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        rows = [json.loads(l) for l in open(path) if l.strip()]
        rows = [r for r in rows if "tokens_per_s" in r]
    window = [r for r in rows if lo <= r["step"] < steps] or rows
    if window:
        med = lambda k: statistics.median(r.get(k, 0.0) for r in window)
        run.update({"tokens_per_s": round(med("tokens_per_s")), "mfu": round(med("mfu"), 4),
                    "comm_ms": round(1e3 * med("comm_s"), 1)})
        if any(r.get("pp_bubble_theory", 0) > 0 for r in window):
            run.update({"pp_bubble": round(med("pp_bubble"), 4),
                        "pp_bubble_theory": round(med("pp_bubble_theory"), 4)})
        run["step_seconds"] = [round(b["elapsed_s"] - a["elapsed_s"], 4)
                               for a, b in zip(rows, rows[1:])]
    if run["exit"] != 0 or not window:
        run["log_tail"] = log[-15:]
    record["runs"].append(run)
    print(f'{name:16s} exit {run["exit"]} tok/s {run.get("tokens_per_s", "-")} '
          f'mfu {run.get("mfu", "-")} comm_ms {run.get("comm_ms", "-")} '
          f'bubble {run.get("pp_bubble", "-")} / {run.get("pp_bubble_theory", "-")}')
json.dump(record, open(out, "w"), indent=1)
PY
