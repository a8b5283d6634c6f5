set -u
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
( cmake -S ab_old/spark_setup/engine -B /tmp/oldb -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/oldb.log 2>&1 && cmake --build /tmp/oldb -j8 >> /tmp/oldb.log 2>&1 || tail -5 /tmp/oldb.log ) &
PYTHONPATH=/tmp/ggp ITERS=${ITERS:-20} bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL|DS4_MATVEC" $OUT/gc.log | head -12
wait
N=build/gpu-sm_90/bench_matvec
run() { echo "== $B $CASE diag=$D"; DS4_V6_DIAG=$D $B --iters 200 --versions 0 --case "$CASE" 2>&1 | grep -E "^\| (attn|output|shared|routed)" | grep " v0 " | cut -d'|' -f2,10,12,13; }
for CASE in ${CASES:-attn_q_b attn_output output shared routed}; do for k in 1 2 3; do B=/tmp/oldb/bench_matvec D=0 run; B=$N D=0 run; done; done 2>&1 | tee $OUT/ab.txt
