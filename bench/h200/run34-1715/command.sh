set -u
cmake -S spark_setup/engine -B build/g90 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 >$OUT/build.log 2>&1 && cmake --build build/g90 -j16 >>$OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
B=build/g90/bench_matvec
$B --iters 60 --versions 6,9,7 --case attn > $OUT/a_default.md 2>&1
for sp in 0 1 2; do DS4_V6_SPARE=$sp $B --iters 60 --versions 9,7 --case attn > $OUT/a_spare$sp.md 2>&1; done
$B --iters 60 --versions 6,9 --case "output head" > $OUT/head.md 2>&1
for f in $OUT/*.md; do echo "== $f"; grep -E "^\| (35|26|16|42)|^\| (attn|output)" $f; done
