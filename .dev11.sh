set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target test_linear_gpu > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
timeout 120 build-gpu/tests/layers/test_linear_gpu > $OUT/test.txt 2>&1; echo rc $?; grep -E "FAILED|PASSED|Failure|Expected|naive|differs|y$" $OUT/test.txt | head -20
for tool in memcheck racecheck; do timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 build-gpu/tests/layers/test_linear_gpu > $OUT/san_$tool.log 2>&1; echo $tool rc $? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" $OUT/san_$tool.log | tail -1); done
