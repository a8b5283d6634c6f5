set -u
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
cmake -S spark_setup/engine -B build/gpu-sm_90 -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build build/gpu-sm_90 -j16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
for k in 1 2 3; do for C in attn_ "output head" shared; do
  build/gpu-sm_90/bench_matvec --iters 200 --versions 0,6,7,9 --case "$C" 2>&1 | grep -E "^\| (attn|output|shared)" | grep -E " v[0-9] " | cut -d'|' -f2,3,10,12
done; done | tee $OUT/ver.txt
