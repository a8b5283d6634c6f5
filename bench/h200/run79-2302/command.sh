set -u
# run 79: per-SASS-instruction executed counts and stall samples (ncu source page, CSV) of the gate+up and down
# launches, to split their instructions between the inner decode loops and everything around them.
B=build/gpu-sm_90
cmake -S spark_setup/engine -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 > /tmp/b.log 2>&1 && cmake --build $B -j 16 --target bench_matvec >> /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
n=0
for C in "gate+up launch only" "down launch only"; do n=$((n+1))
  timeout 150 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 --section SourceCounters --section WarpStateStats \
    -o /tmp/rep$n $B/bench_matvec --iters 3 --versions 0 --case "$C" > /tmp/ncu$n.log 2>&1 || tail -5 /tmp/ncu$n.log
  ncu -i /tmp/rep$n.ncu-rep --page source --csv --print-source sass > /tmp/src_$n.csv 2>&1
  gzip -c /tmp/src_$n.csv > $OUT/src_$n.csv.gz
  python3 tools/ncu_src_top.py /tmp/src_$n.csv --top 25 > $OUT/src_top_$n.txt 2>&1; head -3 $OUT/src_top_$n.txt
done
ls -la $OUT
