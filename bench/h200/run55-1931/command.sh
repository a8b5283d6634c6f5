set -u
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
( rm -rf /tmp/old && mkdir -p /tmp/old && cp -r spark_setup /tmp/old/ && cp old_matvec6.cuh /tmp/old/spark_setup/engine/csrc/cuda/matvec6.cuh &&
  cmake -S /tmp/old/spark_setup/engine -B /tmp/old/b -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/oldb.log 2>&1 && cmake --build /tmp/old/b -j8 >> /tmp/oldb.log 2>&1 || tail -5 /tmp/oldb.log ) &
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL|DS4_MATVEC" $OUT/gc.log | head -12
wait
run() { echo "== $B"; $B --iters 200 --versions 0 --case "$CASE" 2>&1 | grep -E "^\| $CASE" | cut -d'|' -f2,3,10,12,13; }
{
for CASE in attn_ output shared; do
for B in /tmp/old/b/bench_matvec build/gpu-sm_90/bench_matvec /tmp/old/b/bench_matvec build/gpu-sm_90/bench_matvec; do run; done; done
} 2>&1 | tee $OUT/ab.txt
