set -u
# run 72: the IQ2_XXS table build from a global copy with 16-byte stores (was: one indexed constant load per word per
# warp) against 7af5a00 built beside (tools/gpu_ab.sh, which runs gpu_check.sh first); then ncu per-instruction stall
# sampling of the gate+up and down launches (tools/ncu_src_top.py summaries).
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
mkdir -p /tmp/gab; OUT=/tmp/gab PYTHONPATH=/tmp/ggp CASES="routed" ROUNDS=3 ITERS=60 bash tools/gpu_ab.sh ab_old > /tmp/gab/run.log 2>&1; echo "gpu_ab rc=$?"
grep -E "types pass|FAIL" /tmp/gab/gc.log | head -8; cp /tmp/gab/ab.txt /tmp/gab/kernels.md $OUT/; cat /tmp/gab/ab.txt
B=build/gpu-sm_90
n=0
for C in "gate+up launch only" "down launch only"; do n=$((n+1))
  timeout 120 ncu --clock-control none -k regex:matvec6 --launch-skip 5 --launch-count 1 --section SourceCounters --section WarpStateStats \
    -o /tmp/rep$n $B/bench_matvec --iters 3 --versions 0 --case "$C" > /tmp/ncu$n.log 2>&1 || tail -5 /tmp/ncu$n.log
  ncu -i /tmp/rep$n.ncu-rep --page source --csv --print-source sass > /tmp/src_$n.csv 2>&1
  python3 tools/ncu_src_top.py /tmp/src_$n.csv --top 40 > $OUT/src_top_$n.txt 2>&1; head -14 $OUT/src_top_$n.txt
  ncu -i /tmp/rep$n.ncu-rep --page details > $OUT/det_$n.txt 2>&1
done
