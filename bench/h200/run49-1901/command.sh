set -u
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 12 > $OUT/synth.log 2>&1 || tail -3 $OUT/synth.log) &
B=build/gpu-sm_90/bench_matvec
$B --iters 200 --versions 0,6,9,7 --csv $OUT/matvec.csv > $OUT/kernels.md 2>&1
grep -E "^\| (output|attn|shared|routed)" $OUT/kernels.md | cut -d'|' -f2,3,10,12,13 | grep -v "Q4\|F16"; grep -E "^\| (35|26|16|42)" $OUT/kernels.md
mkdir -p $OUT/mc; OUT=$OUT/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh 2>&1 | tail -1
wait
timeout 240 python3 tools/bench_decode.py /dev/shm/s.gguf --lib build/gpu-sm_90/libds4engine.so --contexts 2048,32768 --deadline-s 220 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -5
