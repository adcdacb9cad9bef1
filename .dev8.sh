set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target test_rmsnorm_swiglu_gpu test_gated_rmsnorm_gpu > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
for t in test_rmsnorm_swiglu_gpu test_gated_rmsnorm_gpu; do timeout 120 build-gpu/tests/layers/$t > $OUT/$t.txt 2>&1; echo $t rc $?; grep -E "FAILED|PASSED|Failure|naive error" $OUT/$t.txt | head -8; done
for t in test_rmsnorm_swiglu_gpu test_gated_rmsnorm_gpu; do for tool in memcheck racecheck; do timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 build-gpu/tests/layers/$t > $OUT/san_${t}_$tool.log 2>&1; echo $t $tool rc $? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" $OUT/san_${t}_$tool.log | tail -1); done; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
