set -u
# run 71: x first (XF) as the default of the 2-bit expert launches (IQ2_XXS gate+up, Q2_K down; 12, 16 and 8 warps).
# gpu_check (7 types; defaults and v6/v7/v9 forced), A/B against DS4_V6_XF=0 (three rounds; 8 warps forced too),
# GPU model tests (steps 1-2), decode of the full-size synthetic Q2 model.
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 12 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
mkdir -p /tmp/gc; OUT=/tmp/gc PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8; cp /tmp/gc/kernels.md $OUT/
B=build/gpu-sm_90
r() { echo "$1 xf=$2 v=$3 $(DS4_V6_XF=$2 $B/bench_matvec --iters 200 --versions $3 --case "$1" 2>&1 | grep -E '^\| (routed)' | grep " v$3 " | cut -d'|' -f10,12 | head -1)"; }
for k in 1 2 3; do for x in 1 0; do r "gate+up launch only" $x 0; r "down launch only" $x 0; r "routed experts, Q2" $x 0; done; done 2>&1 | tee $OUT/ab.txt
for k in 1 2; do for x in 1 0; do r "routed experts, Q2" $x 7; done; done 2>&1 | tee -a $OUT/ab.txt
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > /tmp/mc.log 2>&1; echo "model check rc=$?"; tail -3 /tmp/mc.log
wait
timeout 230 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --contexts 2048,8192,16384,32768 --deadline-s 200 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -7
