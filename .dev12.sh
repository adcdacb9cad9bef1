set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target test_linear_gpu > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
timeout 200 compute-sanitizer --tool racecheck --kernel-name-exclude kns=nvjet --error-exitcode 9 build-gpu/tests/layers/test_linear_gpu > $OUT/san_racecheck.log 2>&1; echo racecheck rc $? $(grep -E "RACECHECK SUMMARY|PASSED|FAILED" $OUT/san_racecheck.log | tail -2)
