# shellcheck shell=bash
# Sourced by the launch test scripts: prep_corpus BRAID WORK prepares a small corpus (the Python
# standard library's modules a*-c*) with `braid prep` into WORK/data/{train,valid}.tok;
# losses METRICS prints a run's training losses, one per step; compare NAME A B checks two
# lists of losses agree pairwise within 1e-4 relative (the layout tests' tolerance).
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
compare() {
  paste <(echo "$2") <(echo "$3") | awk -v name="$1" '{
      d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > worst) worst = r; n++ }
    END { printf "%s: %d steps, largest relative loss difference %.2e\n", name, n, worst; exit !(n > 0 && worst <= 1e-4) }'
}
