set -u
# run 76: diagnosis only, no code change. Where do the routed-expert launches (and attn_q_b) lose time: issue
# slots, shared-memory pipe, or latency? ncu's scheduler / warp-state / compute-workload sections at real clocks,
# one launch each (graph-free, caches flushed: ncu's default), and the SASS of the two 2-bit v6 kernels.
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
cuobjdump -sass $B/libds4engine.so > /tmp/all.sass 2>&1
python3 - <<'PY' > $OUT/sass_2bit.txt
import re
t = open('/tmp/all.sass').read().split('\n\t\tFunction : ')
for f in t:
    n = f.split('\n', 1)[0]
    if 'matvec6' in n and ('ExpertRowsELi12ELb1' in n or 'ExpertRowsELi12ELb0' in n) and ('Li16E' in n or 'Li10E' in n):
        print('Function :', f[:200000])
print('\n'.join(f.split('\n',1)[0] for f in t if 'matvec6' in f.split('\n',1)[0]))
PY
grep -c "" $OUT/sass_2bit.txt
n=0
for C in "gate+up launch only" "down launch only" "attn_q_b"; do n=$((n+1))
  timeout 150 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
    $B/bench_matvec --iters 3 --versions 0 --case "$C" > $OUT/ncu_$n.txt 2>&1 || tail -5 $OUT/ncu_$n.txt
done
grep -E "Issue Slots Busy|Issued Ipc|No Eligible|Active Warps Per|Eligible Warps|Stall|Warp Cycles Per Issued|Duration|Pipe|Shared" $OUT/ncu_*.txt | head -80
