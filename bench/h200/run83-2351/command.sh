set -u
# run 83: where a batched prefill step's time goes (session 9's first question). Build; write the full-size
# synthetic Q2 model; prefill 1792 tokens, then one 256-token step under ncu (gpu__time_duration per kernel);
# fold by kernel. Also the engine-level prefill/decode rates at 2k for the baseline.
mount -o remount,size=110G /dev/shm
(python3 tools/synthetic_q2_gguf.py /dev/shm/s.gguf --tokenizer .cache/gpu-models/tokenizer.json --workers 14 > /tmp/synth.log 2>&1 || tail -3 /tmp/synth.log) &
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
wait; date
timeout 300 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file $OUT/prefill.csv \
  python3 tools/profile_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --ctx 1792 --steps 4 --prefill 256 > $OUT/prof.log 2>&1; echo "ncu rc=$?"; tail -3 $OUT/prof.log
python3 tools/profile_decode.py --summarize $OUT/prefill.csv > $OUT/prefill_summary.md; head -30 $OUT/prefill_summary.md
timeout 150 python3 tools/bench_decode.py /dev/shm/s.gguf --lib $B/libds4engine.so --contexts 2048 --deadline-s 120 --out $OUT/dec 2>&1 | grep -E "ctx|short|skipped" | tail -4
