set -u
# run 69: (1) column split forced (DS4_V6_KS) on the plain Q8_0 matrices, three rounds alternating: does having a
# tile's chunks requested together (DRAM locality) beat one warp walking a tile's chunks in turn?
# (2) ncu per-SASS-instruction source counters of gate+up and attn_q_b (src_*.csv), and DRAM/L2/shared totals.
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
B=build/gpu-sm_90
{ cmake -S spark_setup/engine -B $B -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 && cmake --build $B -j16; } > /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
r() { echo "$1 ks=$2 $(DS4_V6_KS=$2 $B/bench_matvec --iters 200 --versions 0 --case "$1" 2>&1 | grep -E '^\| (attn|output)' | grep ' v0 ' | grep -v grouped | cut -d'|' -f10,12 | head -1)"; }
for k in 1 2 3; do
  for s in 0 2 4 8; do r attn_q_b $s; done
  for s in 0 8 16 2; do r attn_output_a $s; done
  for s in 0 2 4; do r "output head" $s; done
  for s in 0 4 8; do r attn_output_b $s; done
done 2>&1 | tee $OUT/ab.txt
n=0
for C in "gate+up launch only" "attn_q_b"; do n=$((n+1))
  timeout 120 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 --section SourceCounters \
    -o /tmp/rep$n $B/bench_matvec --iters 3 --versions 0 --case "$C" > /tmp/ncu$n.log 2>&1 || tail -5 /tmp/ncu$n.log
  ncu -i /tmp/rep$n.ncu-rep --page source --csv --print-source sass > $OUT/src_$n.csv 2>&1 || head -5 $OUT/src_$n.csv
done
for C in "gate+up launch only" "attn_q_b"; do echo "== $C"
  timeout 120 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 \
    --metrics dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,smsp__inst_executed_op_ldgsts.sum,gpu__time_duration.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum \
    $B/bench_matvec --iters 3 --versions 0 --case "$C" 2>&1 | grep -E "^ +[a-z]" 
done 2>&1 | tee $OUT/metrics.txt
