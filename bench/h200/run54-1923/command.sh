set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL|DS4_MATVEC" $OUT/gc.log | head -12
grep -A16 "^| case | v0 | v6" $OUT/kernels.md | grep -v "Q4\|F16"; grep -E "^\| (35|26|16|42)" $OUT/kernels.md
