#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, build `braid` (with CUDA only where a GPU
# is present), turn the Python standard library sources into byte-level token shards, and train
# the tiny hybrid model (configs/tiny_cpu.yaml) on the CPU, printing train and held-out loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_deps.sh
cuda=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=ON; fi
cmake -S . -B build-main -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_TESTS=OFF -DBRAID_CUDA=$cuda >/dev/null
cmake --build build-main --target braid
stdlib=$(dirname "$(ls /usr/lib/python3*/os.py | sort -V | tail -n 1)")
./build-main/launch/braid prep --input "$stdlib"/*.py --out corpus/python_stdlib
./build-main/launch/braid train --config configs/tiny_cpu.yaml "$@"
