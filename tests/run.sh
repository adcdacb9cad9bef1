#!/usr/bin/env bash
# Installs dependencies, builds everything with warnings as errors (the CUDA code too wherever
# nvcc exists, so a broken kernel never lands), and runs the whole test suite in parallel. GPU
# tests run where a GPU is visible and are reported as skipped elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_deps.sh
cuda=OFF
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then cuda=ON; fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_WERROR=ON -DBRAID_CUDA=$cuda
cmake --build build
ctest --test-dir build -j "$(nproc)" --output-on-failure "$@"
