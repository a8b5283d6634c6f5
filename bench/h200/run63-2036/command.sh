set -u
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
cmake -S spark_setup/engine -B build/gpu-sm_90 -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build build/gpu-sm_90 -j16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
B=build/gpu-sm_90/bench_matvec
n=0
for C in "gate+up launch only" "down launch only" "attn_q_b"; do n=$((n+1))
  timeout 150 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,sm__cycles_elapsed.avg,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__warps_active.avg.per_cycle_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,gpu__time_duration.sum' \
    $B --iters 3 --versions 0 --case "$C" > $OUT/ncu_$n.txt 2>&1
  echo "== $C"; grep -E "stalled|inst_executed|cycles_elapsed|issue_active|warps_active|wavefronts|duration" $OUT/ncu_$n.txt | awk '$NF+0 > 0.05 || /inst|cycles|dur|wave|active/' | sed 's/smsp__average_warps_issue_stalled_//' | awk '{print $1, $NF}'
done
