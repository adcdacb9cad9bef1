set -u
export PATH=/usr/local/cuda/bin:$PATH
BRAID_DEPS_PREFIX=$PWD/.deps/root/usr BRAID_COMMIT=af8eb4c bash tests/run_gpu.sh > $OUT/run_gpu.txt 2>&1
echo rc $?
cat $OUT/bench_ssd.txt $OUT/bench_selective_scan.txt
cat $OUT/gpu_tests.json
grep -E "tests passed|tests failed|Failed|\*\*\*" $OUT/gpu_ctest.log | head
