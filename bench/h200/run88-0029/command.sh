set -u
# run 88: the session's final engine (ce7cac2): kernel checks (incl. the batched products), CUDA model tests, and the
# synthetic Q2 model's walk to 32k (prefill of each 2048-token interval, 128 decoded tokens at each context).
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
PYTHONPATH=/tmp/ggp timeout 120 python3 tools/gpu_check.py --lib $B/libds4engine.so > $OUT/kernel_check.txt 2>&1; echo "gpu_check rc=$?"; tail -1 $OUT/kernel_check.txt
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo "model check rc=$?"; grep -E "passed|failed" $OUT/mc.log | head -3
wait; date
timeout 170 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --contexts 2048,8192,16384,32768 --deadline-s 160 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -6
