set -u
# run 89: prefill steps of 512 and 1024 tokens (kMaxBatch 1024, default still 256) against 256: CUDA model tests,
# then tools/prefill_ab.py on the synthetic Q2 model at 2048 tokens (two rounds) and 8192 (one); a token's
# arithmetic does not depend on the step it is in, so the logits must match bit for bit (rel diff 0).
mount -o remount,size=110G /dev/shm
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 100 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo "model check rc=$?"; grep -E "passed|failed" $OUT/mc.log | head -3
wait; date
L=$B/libds4engine.so
timeout 60 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 2 --config b256: --config b512:DS4_CUDA_PREFILL_BATCH=512 --config b1024:DS4_CUDA_PREFILL_BATCH=1024 > $OUT/ab.txt 2>&1; cat $OUT/ab.txt
timeout 60 python3 tools/prefill_ab.py /dev/shm/s.gguf --lib $L --rounds 1 --tokens 8192 --config b256: --config b512:DS4_CUDA_PREFILL_BATCH=512 --config b1024:DS4_CUDA_PREFILL_BATCH=1024 > $OUT/ab8k.txt 2>&1; cat $OUT/ab8k.txt
