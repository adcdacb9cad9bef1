set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DBRAID_WERROR=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target test_ssd_gpu test_gated_rmsnorm_gpu bench_ssd > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo build $(( $(date +%s) - t0 ))s
cuobjdump -res-usage build-gpu/bench/bench_ssd 2>/dev/null | grep -A1 -E "ssd" | grep -E "Function|REG" | sed 's/_ZN5braid3ssd[^ ]*//' | head -40 > $OUT/res.txt
timeout 200 build-gpu/tests/layers/test_ssd_gpu > $OUT/test_ssd.txt 2>&1; echo test_ssd rc $?
timeout 60 build-gpu/tests/layers/test_gated_rmsnorm_gpu > $OUT/test_gn.txt 2>&1; echo test_gn rc $?
timeout 120 build-gpu/bench/bench_ssd --out $OUT/bench_ssd.json > $OUT/bench.txt 2>&1; echo bench rc $?
grep -E "FAILED|OK \]|max err|Failure|error|out of bounds|differs" $OUT/test_ssd.txt | head -80
grep -E "FAILED|PASSED|Failure|error" $OUT/test_gn.txt | head -20
cat $OUT/bench.txt
