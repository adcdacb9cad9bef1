set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target test_ssd_gpu bench_ssd > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
timeout 200 build-gpu/tests/layers/test_ssd_gpu > $OUT/test_ssd.txt 2>&1; echo test_ssd rc $?
grep -E "FAILED|PASSED|Failure|out of bounds|differs" $OUT/test_ssd.txt | head -20
grep worst $OUT/test_ssd.txt | awk '{print $1, $NF}' | sort -k2 -g | tail -3
timeout 120 build-gpu/bench/bench_ssd --out $OUT/bench_ssd.raw.json > $OUT/bench_ssd.txt 2>&1; echo bench rc $?
cat $OUT/bench_ssd.txt
for tool in memcheck racecheck; do timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 build-gpu/tests/layers/test_ssd_gpu > $OUT/san_$tool.log 2>&1; echo $tool rc $? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" $OUT/san_$tool.log | tail -1); done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
