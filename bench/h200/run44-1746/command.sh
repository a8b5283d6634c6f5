set -u
mount -o remount,size=110G /dev/shm
bd=build/gpu-sm_90
cmake -S spark_setup/engine -B $bd -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 >$OUT/build.log 2>&1 && cmake --build $bd -j16 >>$OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
mkdir -p $OUT/mc; OUT=$OUT/mc STEPS=2 bash tools/gpu_model_check.sh 2>&1 | tail -3
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 16 > $OUT/synth.log 2>&1 || tail $OUT/synth.log)
timeout 200 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $bd/libds4engine.so --contexts 2048,16384 --out $OUT/dec 2>&1 | grep -E "ctx|bandwidth|short|graphs" | tail -6
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 200 $NCU --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file $OUT/kernels.csv python3 tools/profile_decode.py /dev/shm/s.gguf --lib $bd/libds4engine.so --ctx 2048 2>&1 | tail -2
python3 tools/profile_decode.py --summarize $OUT/kernels.csv > $OUT/summary.md; head -16 $OUT/summary.md
