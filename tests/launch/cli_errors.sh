#!/usr/bin/env bash
# Bad input to the braid binary gives one error line on stderr and exit status 2, never a crash
# or a hang: an unknown config key, a missing data file, a truncated shard, a token id >= vocab.
set -u
braid="$1"
config="$2"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0

expect_error() {  # name, expected substring, command...
  local name="$1" want="$2"
  shift 2
  timeout 60 "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  local lines
  lines=$(wc -l <"$work/err")
  if [ "$rc" -ne 2 ] || [ "$lines" -ne 1 ] || ! grep -q -- "$want" "$work/err"; then
    echo "FAIL $name: exit $rc, $lines stderr line(s), wanted '$want':"
    cat "$work/err"
    fails=$((fails + 1))
  else
    echo "ok   $name: $(cat "$work/err")"
  fi
}

mkdir -p "$work/src"
for i in $(seq 1 30); do printf 'def f%d(x):\n    return x * %d\n' "$i" "$i" >"$work/src/m$i.py"; done
"$braid" prep --input "$work/src" --out "$work/data" --valid-fraction 0.3 >/dev/null || { echo "FAIL prep"; exit 1; }
ok=(data.train="[$work/data/train.tok]" data.valid="[$work/data/valid.tok]" train.steps=1 train.seq_len=16
    train.micro_batch=1 optim.warmup=0 train.out_dir="$work/run")

expect_error "unknown key" "unknown key 'model.d_modle'" "$braid" train --config "$config" "${ok[@]}" model.d_modle=3
expect_error "missing data file" "cannot open" "$braid" train --config "$config" "${ok[@]}" \
  data.train="[$work/data/missing.tok]"

head -c 100 "$work/data/train.tok" >"$work/trunc.tok"
expect_error "truncated shard" "truncated" "$braid" train --config "$config" "${ok[@]}" data.train="[$work/trunc.tok]"

cp "$work/data/train.tok" "$work/bad.tok"
printf '\xff\x7f' | dd of="$work/bad.tok" bs=1 seek=70 conv=notrunc status=none  # token 3 := 32767
expect_error "token id >= vocab" "token id 32767 at byte offset 70" "$braid" train --config "$config" "${ok[@]}" \
  data.train="[$work/bad.tok]"

expect_error "bad value" "expected an integer" "$braid" train --config "$config" "${ok[@]}" train.steps=many
expect_error "vocab too small" "model.vocab_size = 100" "$braid" train --config "$config" "${ok[@]}" model.vocab_size=100
expect_error "no config" "--config FILE is required" "$braid" train

[ "$fails" -eq 0 ] && echo "all CLI error checks passed"
exit "$fails"
