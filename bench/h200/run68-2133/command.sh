set -u
# run 68: (1) gpu_check (build, 7 types, defaults + v6/v7/v9), and the new 3-stage Q8_0 rings checked too;
# (2) A/B in one call: plain Q8_0 in 16 warps with DS4_V6_Q8NS=0 (2 stages, 1 before the PDL wait), 3 (3 stages,
#     1 before the wait, 1 after it before the x conversion), 4 (3 stages, both before the wait), three rounds;
# (3) ncu per-SASS-instruction stall sampling (SourceCounters) of the gate+up launch, the down launch and attn_q_b.
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
B=build/gpu-sm_90
for q in 3 4; do echo "-- DS4_V6_Q8NS=$q"; DS4_V6_Q8NS=$q PYTHONPATH=/tmp/ggp timeout 200 python3 tools/gpu_check.py --lib $B/libds4engine.so 2>&1 | tail -2; done | tee $OUT/check_q8ns.txt
for k in 1 2 3; do for q in 0 3 4; do for C in attn_q_b attn_output_a "output head" attn_output_b; do
  echo "q8ns=$q $(DS4_V6_Q8NS=$q $B/bench_matvec --iters 200 --versions 0 --case "$C" 2>&1 | grep -E '^\| (attn|output)' | grep ' v0 ' | grep -v grouped | cut -d'|' -f2,10,12 | head -1)"
done; done; done | tee $OUT/ab.txt
n=0
for C in "gate+up launch only" "attn_q_b"; do n=$((n+1))
  timeout 120 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 --section SourceCounters --section WarpStateStats \
    -o /tmp/rep$n $B/bench_matvec --iters 3 --versions 0 --case "$C" > /tmp/ncu$n.log 2>&1 || tail -5 /tmp/ncu$n.log
  ncu -i /tmp/rep$n.ncu-rep --page source --csv --print-source sass > $OUT/src_$n.csv 2>&1 || head -5 $OUT/src_$n.csv
  ncu -i /tmp/rep$n.ncu-rep --page details --print-details all > $OUT/det_$n.txt 2>&1
  wc -l $OUT/src_$n.csv; head -2 $OUT/src_$n.csv | cut -c1-600
done
