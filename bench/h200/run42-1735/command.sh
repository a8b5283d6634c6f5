set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head
grep -A12 "^| case | v6 | v9" $OUT/kernels.md | grep -v "Q4\|F16"
B=build/gpu-sm_90/bench_matvec
for d in 0 8; do DS4_V6_DIAG=$d $B --iters 60 --versions 6,7 --case attn 2>&1 | grep -E "^\| attn.*\| v" | awk -F'|' -v d=$d '{print "diag",d,$2,$3,$10,$12}'; done | tee $OUT/diag.txt
$B --iters 100 --versions 6 --case routed 2>&1 | grep -E "^\| routed.*\| v" | awk -F'|' '{print $2,$3,$10,$12}'
