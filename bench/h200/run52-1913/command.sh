set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
cmake -S spark_setup/engine -B build/u2 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 -DCMAKE_CUDA_FLAGS=-DDS4_IQ2_UNROLL=2 > $OUT/u2build.log 2>&1 && cmake --build build/u2 -j16 >> $OUT/u2build.log 2>&1 || tail -5 $OUT/u2build.log
PYTHONPATH=/tmp/ggp python3 tools/gpu_check.py --lib build/u2/libds4engine.so 2>&1 | tail -1
run() { echo "== $B $*"; env "$@" $B --iters 200 --versions $V --case "$CASE" 2>&1 | grep -E "^\| $CASE" | cut -d'|' -f2,3,10,12,13; }
{
for B in build/gpu-sm_90/bench_matvec build/u2/bench_matvec build/gpu-sm_90/bench_matvec build/u2/bench_matvec; do V=6 CASE=routed run X=1; done
B=build/u2/bench_matvec; V=6 CASE=routed run DS4_V6_DIAG=2
} 2>&1 | tee $OUT/sweep.txt
