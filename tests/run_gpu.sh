#!/usr/bin/env bash
# On a GPU machine: build the GPU test and benchmark binaries with CUDA, run the GPU-labelled
# tests, run each GPU test binary under compute-sanitizer (memcheck and racecheck), run the
# kernel benchmarks, and write JSON records (gpu_tests.json, bench_*.json) to
# ${OUT:-bench/results}/gpu_tests.json. BRAID_DEPS_PREFIX names an extra install prefix for
# libraries the machine lacks; BRAID_COMMIT is recorded in the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
prefix_args=()
if [ -n "${BRAID_DEPS_PREFIX:-}" ]; then
  prefix_args=(-DCMAKE_PREFIX_PATH="$BRAID_DEPS_PREFIX" -DOPENSSL_ROOT_DIR="$BRAID_DEPS_PREFIX")
  export LD_LIBRARY_PATH="$BRAID_DEPS_PREFIX/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
fi
export PATH="/usr/local/cuda/bin:$PATH"
start=$(date +%s)
gpu_targets="test_cuda_backend test_selective_scan_gpu test_conv1d_gpu test_ssd_gpu test_attention_gpu test_gated_rmsnorm_gpu test_rmsnorm_swiglu_gpu test_adamw_gpu test_embedding_gpu test_linear_gpu test_small_ops_gpu test_moe_gpu test_model_gpu braid bench_selective_scan bench_ssd bench_attention bench_moe_gemm bench_model_gpu"  # gpu tests (train_gpu.sh runs braid) + benchmarks
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON "${prefix_args[@]}" \
  >"$out/gpu_build.log" 2>&1 && cmake --build build-gpu --target $gpu_targets >>"$out/gpu_build.log" 2>&1
build_rc=$?
# The multi-rank NCCL tests (labels gpu;mpiN) need N GPUs: they run with mpirun on a multi-GPU
# machine (tests/README.md), not here.
ctest --test-dir build-gpu -L gpu -LE mpi --output-on-failure >"$out/gpu_ctest.log" 2>&1
gpu_rc=$?
gpu_summary=$(grep -E "tests passed|tests failed" "$out/gpu_ctest.log" | tail -n 1)
san_rc=0
san=""
for bin in build-gpu/tests/runtime/test_cuda_backend build-gpu/tests/layers/test_selective_scan_gpu \
  build-gpu/tests/layers/test_conv1d_gpu build-gpu/tests/layers/test_ssd_gpu \
  build-gpu/tests/layers/test_attention_gpu \
  build-gpu/tests/layers/test_gated_rmsnorm_gpu build-gpu/tests/layers/test_rmsnorm_swiglu_gpu \
  build-gpu/tests/optim/test_adamw_gpu build-gpu/tests/layers/test_embedding_gpu \
  build-gpu/tests/layers/test_linear_gpu build-gpu/tests/layers/test_small_ops_gpu \
  build-gpu/tests/layers/test_moe_gpu build-gpu/tests/layers/test_model_gpu; do
  for tool in memcheck racecheck; do
    log="$out/sanitizer_$(basename "$bin")_${tool}.log"
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin" >"$log" 2>&1
    rc=$?
    [ "$rc" -ne 0 ] && san_rc=$rc
    san="$san{\"binary\": \"$bin\", \"tool\": \"$tool\", \"exit\": $rc, \"summary\": \"$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1)\"},"
  done
done
bench_rc=0
benches="selective_scan ssd attention moe_gemm"
if [ "$build_rc" -eq 0 ]; then
  for b in $benches; do
    build-gpu/bench/bench_$b --out "$out/bench_$b.raw.json" | tee "$out/bench_$b.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && bench_rc=$rc
  done
fi
device=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
cat >"$out/gpu_tests.json" <<JSON
{
  "command": "bash tests/run_gpu.sh",
  "commit": "${BRAID_COMMIT:-unknown}",
  "device": "$device",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "build_exit": $build_rc,
  "gpu_tests": {"exit": $gpu_rc, "summary": "$gpu_summary"},
  "compute_sanitizer": [${san%,}],
  "seconds": $(( $(date +%s) - start ))
}
JSON
for b in $benches; do
  if [ -f "$out/bench_$b.raw.json" ]; then
    printf '{"command": "build-gpu/bench/bench_%s (via bash tests/run_gpu.sh)", "commit": "%s", "device": "%s", "date": "%s", "results": %s}\n' \
      "$b" "${BRAID_COMMIT:-unknown}" "$device" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(cat "$out/bench_$b.raw.json")" \
      >"$out/bench_$b.json"
    rm -f "$out/bench_$b.raw.json"
  fi
done
cat "$out/gpu_tests.json"
tail -n 25 "$out/gpu_ctest.log"
[ "$build_rc" -eq 0 ] && [ "$gpu_rc" -eq 0 ] && [ "$san_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
