set -u
# run 84: the tensor-core prefill GEMM (cuda/mm6.cuh, first GPU run). Kernel checks (gpu_check.py: every type, and
# the batched product of Q8_0 / Q2_K / IQ2_XXS against float64 and the CPU engine, dense and expert mode); the CUDA
# model tests (batched prefill vs the CPU engine); the synthetic Q2 model: prefill of 2048 tokens with mm6 off / on
# (same prompt, last logits compared), decode at 2k; one 256-token step under ncu again (cf. run 83).
mount -o remount,size=110G /dev/shm
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
PYTHONPATH=/tmp/ggp timeout 120 python3 tools/gpu_check.py --lib $B/libds4engine.so > $OUT/kernel_check.txt 2>&1; echo "gpu_check rc=$?"; cat $OUT/kernel_check.txt | cut -c1-400
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo "model check rc=$?"; tail -4 $OUT/mc.log
wait; date
timeout 200 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --contexts 2048 --compare 256:1:0,256:1:1 --deadline-s 170 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped|compare" | tail -6
timeout 150 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file /tmp/prefill.csv \
  python3 tools/profile_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --ctx 1792 --steps 2 --prefill 256 > $OUT/prof.log 2>&1; echo "ncu rc=$?"; tail -2 $OUT/prof.log
python3 tools/profile_decode.py --summarize /tmp/prefill.csv > $OUT/prefill_summary.md; head -16 $OUT/prefill_summary.md
