set -u
cmake -S spark_setup/engine -B build/g90 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 >$OUT/build.log 2>&1 && cmake --build build/g90 -j16 >>$OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
B=build/g90/bench_matvec
for m in 0 1 3 7; do DS4_V6_PREALL=$m $B --iters 60 --versions 6,9,7 > $OUT/pre$m.md 2>&1; done
for m in 0 1 3 7; do echo "== PREALL $m"; grep -A14 "^| case | v6 | v9" $OUT/pre$m.md | grep -vE "Q4|F16|plain"; done
