set -u
# run 85: mm6 with 4 row blocks per expert-mode CTA (DS4_MM6_RB) and the batched attention with 8 heads a block
# (DS4_CUDA_ATTN_HEADS): kernel checks, CUDA model tests, then on the synthetic Q2 model a prefill A/B (2048 tokens,
# settings alternating, two rounds), the f32 GEMM against mm6 with the round-trips off (numeric agreement), the
# decode/prefill walk to 32k, and the 256-token step under ncu.
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
PYTHONPATH=/tmp/ggp timeout 120 python3 tools/gpu_check.py --lib $B/libds4engine.so > $OUT/kernel_check.txt 2>&1; echo "gpu_check rc=$?"; tail -1 $OUT/kernel_check.txt; grep FAIL $OUT/kernel_check.txt | cut -c1-300
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo "model check rc=$?"; tail -2 $OUT/mc.log
wait; date
L=$B/libds4engine.so
timeout 150 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 2 --config base: --config rb1:DS4_MM6_RB=1 \
  --config rb2:DS4_MM6_RB=2 --config rb8:DS4_MM6_RB=8 --config attn4:DS4_CUDA_ATTN_HEADS=4 > $OUT/ab.txt 2>&1; cat $OUT/ab.txt
timeout 60 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 1 --no-roundtrip --config f32gemm:DS4_CUDA_MM6=0 --config mm6: > $OUT/ab_noroundtrip.txt 2>&1; cat $OUT/ab_noroundtrip.txt
timeout 150 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $L --contexts 2048,8192,16384,32768 --deadline-s 140 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -6
timeout 100 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file /tmp/prefill.csv \
  python3 tools/profile_decode.py /dev/shm/s.gguf --lib $L --ctx 1792 --steps 2 --prefill 256 > $OUT/prof.log 2>&1; echo "ncu rc=$?"; tail -1 $OUT/prof.log
python3 tools/profile_decode.py --summarize /tmp/prefill.csv > $OUT/prefill_summary.md; head -14 $OUT/prefill_summary.md | tail -11
