set -u
# run 87: the batched attention with 2 rows in flight per warp (DS4_CUDA_ATTN_ROWS=2, 239 registers, one CTA per SM)
# against 1 (118 registers, two CTAs per SM): kernel checks, CUDA model tests, prefill A/B at 2048 and 8192 tokens,
# then the walk to 32k with the faster setting, and the 256-token step under ncu.
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
PYTHONPATH=/tmp/ggp timeout 120 python3 tools/gpu_check.py --lib $B/libds4engine.so > $OUT/kernel_check.txt 2>&1; echo "gpu_check rc=$?"; tail -1 $OUT/kernel_check.txt
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo "model check rc=$?"; grep -E "passed|failed" $OUT/mc.log | head -3
wait; date
L=$B/libds4engine.so
timeout 100 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 2 --config rows2: --config rows1:DS4_CUDA_ATTN_ROWS=1 > $OUT/ab.txt 2>&1; cat $OUT/ab.txt
timeout 100 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 1 --tokens 8192 --config rows2: --config rows1:DS4_CUDA_ATTN_ROWS=1 > $OUT/ab8k.txt 2>&1; cat $OUT/ab8k.txt
R=$(python3 -c "
import re,collections
d=collections.defaultdict(list)
for f in ('$OUT/ab.txt','$OUT/ab8k.txt'):
    for l in open(f):
        m=re.search(r'(rows\d):\s+([\d.]+) t/s',l)
        if m: d[m.group(1)].append(float(m.group(2)))
print(1 if sum(d['rows1'])>sum(d['rows2']) else 2)"); echo "walk with DS4_CUDA_ATTN_ROWS=$R"
DS4_CUDA_ATTN_ROWS=$R timeout 150 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $L --contexts 2048,8192,16384,32768 --deadline-s 140 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -6
DS4_CUDA_ATTN_ROWS=$R timeout 100 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file /tmp/prefill.csv \
  python3 tools/profile_decode.py /dev/shm/s.gguf --lib $L --ctx 1792 --steps 2 --prefill 256 > $OUT/prof.log 2>&1; echo "ncu rc=$?"; tail -1 $OUT/prof.log
python3 tools/profile_decode.py --summarize /tmp/prefill.csv > $OUT/prefill_summary.md; head -12 $OUT/prefill_summary.md | tail -9
