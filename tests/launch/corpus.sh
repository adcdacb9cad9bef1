# shellcheck shell=bash
# Sourced by the launch test scripts: prep_corpus BRAID WORK prepares a small corpus (the Python
# standard library's modules a*-c*) with `braid prep` into WORK/data/{train,valid}.tok.
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
