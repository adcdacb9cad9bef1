set -u
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu
P=$PWD/.deps/root/usr; [ -d build-gpu ] || cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBRAID_CUDA=ON -DCMAKE_PREFIX_PATH=$P -DOPENSSL_ROOT_DIR=$P > $OUT/cmake.log 2>&1
cmake --build build-gpu --target bench_ssd > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
which ncu nsys
timeout 300 ncu -k regex:'prep_kernel|chunk_|state_pass|dx_kernel|dbc_kernel|reduce_|dt_grad' --launch-count 14 --metrics gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active build-gpu/bench/bench_ssd > $OUT/ncu.txt 2>&1
grep -E "^  [a-z_]+.*\(|gpu__time|warps_active|hmma" $OUT/ncu.txt | sed 's/(braid::SsdParams)//' | head -80
