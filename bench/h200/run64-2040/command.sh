set -u
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 12 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
grep -A40 "^| case | v6 | v9" $OUT/kernels.md | grep -v "Q4\|F16" | head -14; grep -E "^\| (35|26|16|42)" $OUT/kernels.md
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh 2>&1 | tail -1
wait
timeout 250 python3 tools/bench_decode.py /dev/shm/s.gguf --lib build/gpu-sm_90/libds4engine.so --contexts 2048,8192,16384,32768 --deadline-s 220 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -7
