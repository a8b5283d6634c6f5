set -u
cmake -S spark_setup/engine -B build/g90 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 >$OUT/build.log 2>&1 && cmake --build build/g90 -j16 >>$OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
B=build/g90/bench_matvec
$B --iters 60 --versions 6,9 --case attn_q_b > $OUT/a_default.md 2>&1
for g in 2 4 8; do for p in 4 8 16; do echo "dep grid $g pre $p" >> $OUT/dep.txt; DS4_DEP_GRID=$g DS4_DEP_PRE=$p $B --iters 60 --versions 6 --case zzz 2>&1 | grep -E "^\| (35|26|16|42)" >> $OUT/dep.txt; done; done
$B --iters 60 --versions 9 --case output > $OUT/head.md 2>&1
for f in $OUT/*.md; do echo "== $f"; grep -E "^\| (35|26|16|42)|^\| (attn|output)" $f; done; cat $OUT/dep.txt
