set -u
# run 82: the session's final kernels (e6b97b0): gpu_check (7 types; defaults, v6/v7/v9 forced; the benchmark with
# ITERS=60 -> kernels.md), every version side by side on the goal cases and the routed experts (ver.txt), GPU model
# tests (steps 1-2).
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
mkdir -p /tmp/gc; OUT=/tmp/gc PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8; cp /tmp/gc/kernels.md $OUT/
B=build/gpu-sm_90
for C in attn_ "output head" "routed experts, Q2" "gate+up" "down launch"; do
  $B/bench_matvec --iters 200 --versions 0,6,7,9 --case "$C" 2>&1 | grep -E "^\| (attn|output|routed)" | grep -E " v[0-9] " | cut -d'|' -f2,3,10,12
done > $OUT/ver.txt; grep " v0 " $OUT/ver.txt
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > /tmp/mc.log 2>&1; echo "model check rc=$?"; tail -2 /tmp/mc.log
