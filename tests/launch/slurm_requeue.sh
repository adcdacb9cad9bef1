#!/usr/bin/env bash
# A real SLURM on localhost (munged, slurmctld, slurmd from the Debian packages, started here
# with a private configuration and ports) runs launch/slurm/braid.sbatch as a 2-task job (srun,
# PMIx). The test sends the batch shell SIGUSR1, as `--signal=B:USR1@N` does before a time
# limit. Both ranks stop at a step boundary and save; braid exits 3 and the script requeues the
# job. The requeued job resumes from that checkpoint and finishes, and its final checkpoint
# equals an uninterrupted 2-rank run's, bit for bit. Exits 77 (skipped) without the SLURM
# packages, without root, or when the daemons do not come up here.
# Usage: slurm_requeue.sh BRAID CONFIG MPIRUN...
set -u
braid=$(realpath "$1")  # the job runs in another directory
config=$(realpath "$2")
shift 2
mpirun=("$@")
for tool in munged slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "skipped: no $tool"; exit 77; }
done
[ "$(id -u)" -eq 0 ] || { echo "skipped: the SLURM daemons are started as root"; exit 77; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$work"/*.log "$work"/job/braid-*.out; do [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }; done; exit 1; }
host=$(hostname)
mkdir -p "$work/state" "$work/spool" "$work/job" /run/munge
chown munge:munge /run/munge 2>/dev/null
# The daemons not coming up is this machine's matter, not Braid's: skipped, with the reason.
skip() { echo "skipped: $*"; for f in "$work"/slurm*.log; do [ -f "$f" ] && tail -n 5 "$f"; done; exit 77; }
if [ ! -S /run/munge/munge.socket.2 ]; then
  runuser -u munge -- /usr/sbin/munged || skip "munged did not start"
  pids+=("$(cat /run/munge/munged.pid)")  # ours: stopped at the end
fi
export SLURM_CONF="$work/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=braidtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobRequeue=1
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
NodeName=$host CPUs=$(nproc --all) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$work/slurmctld.out.log" 2>&1 &
pids+=($!)
sleep 1
/usr/sbin/slurmd -D -f "$SLURM_CONF" >"$work/slurmd.out.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 0.5; done
sinfo -h -o %T | grep -q idle || skip "the SLURM node did not come up"

# shellcheck source=tests/launch/corpus.sh
. "$(dirname "$0")/corpus.sh"
prep_corpus "$braid" "$work" >/dev/null
args=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=60
      train.seq_len=64 train.micro_batch=2 optim.warmup=2 train.log_interval=20
      train.eval_interval=60 train.eval_batches=1 model.d_model=64 mlp.ffn=128 moe.ffn=64
      mamba2.head_dim=16 mamba2.chunk=16 checkpoint.interval=1000 train.threads=1)
"${mpirun[@]}" -np 2 "$braid" train --config "$config" "${args[@]}" train.out_dir="$work/ref" \
  >"$work/ref.log" 2>&1 || fail "2-rank reference run"

sbatch_file="$(cd "$(dirname "$0")/../.." && pwd)/launch/slurm/braid.sbatch"
jid=$(BRAID="$braid" sbatch --parsable --ntasks=2 --chdir="$work/job" "$sbatch_file" "$config" \
  "${args[@]}" train.out_dir="$work/run") || fail "sbatch"
out="$work/job/braid-$jid.out"
for _ in $(seq 1 600); do
  grep -q '"kind": "train"' "$work/run/metrics.jsonl" 2>/dev/null && break
  sleep 0.1
done
scancel --signal=USR1 --batch "$jid" || fail "scancel --signal=USR1"
for _ in $(seq 1 300); do grep -q "requeueing job $jid" "$out" 2>/dev/null && break; sleep 0.2; done
grep -q "requeueing job $jid" "$out" || fail "the job did not ask for a requeue"
# SLURM holds a requeued job back for a while; start it once the first run's step has been
# cleaned up (its PMIx directory removed), instead of two minutes later.
for _ in $(seq 1 50); do
  squeue -h -j "$jid" -o %T 2>/dev/null | grep -q PENDING && break
  sleep 0.2
done
for _ in $(seq 1 150); do
  pgrep -f "slurmstepd: \[$jid\." >/dev/null || [ -e "$work/spool/stepd.slurm.pmix.$jid.0" ] || break
  sleep 0.2
done
scontrol update JobId="$jid" StartTime=now >/dev/null 2>&1
for _ in $(seq 1 600); do grep -q "braid: done (job $jid)" "$out" 2>/dev/null && break; sleep 0.5; done
grep -q "braid: done (job $jid)" "$out" || fail "the requeued job did not finish"
stopped=$(sed -n 's/.*stopped on SIGUSR1 after step \([0-9]*\).*/\1/p' "$out" | head -n 1)
[ -n "$stopped" ] || fail "no stop line"
grep -q "resumed from .*step_$(printf %08d "$stopped") at step $stopped" "$out" || fail "no resume from step $stopped"
digests() { grep -o '"sha256": "[0-9a-f]*"' "$1/checkpoints/step_00000060/manifest.json"; }
diff <(digests "$work/ref") <(digests "$work/run") >/dev/null ||
  fail "the requeued job's final checkpoint differs from the uninterrupted run's"
echo "SLURM job $jid (2 tasks): SIGUSR1 -> both ranks saved at step $stopped and exited 3 ->"
echo "  requeued -> resumed at step $stopped -> finished; final checkpoint equal to the uninterrupted run"
