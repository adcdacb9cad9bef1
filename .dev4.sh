set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target bench_ssd > $OUT/build.log 2>&1 || { grep -E "error" $OUT/build.log | head; exit 1; }
timeout 300 ncu -k regex:'chunk_scan|chunk_state' --launch-skip 4 --launch-count 2 --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats build-gpu/bench/bench_ssd > $OUT/ncu.txt 2>&1
grep -vE "^    -+|^\s*$|OPT|INF|See the|Check the|This|The |guide|improve|theoretical|^          " $OUT/ncu.txt | cut -c1-110 | head -150
