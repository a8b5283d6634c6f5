set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
B=build/gpu-sm_90/bench_matvec
run() { echo "== $*"; env "$@" $B --iters 200 --versions $V --case $CASE 2>&1 | grep -E "^\| $CASE" | cut -d'|' -f2,3,10,12,13; }
{
V=0,6,9,7 CASE=attn_ run X=1
V=9 CASE=attn_output_a run DS4_V6_DIAG=8
V=9 CASE=attn_output_a run DS4_V9_MINR=150
V=0 CASE=attn_output_a run DS4_V9_NS=3 DS4_V6_PRE=1
V=0 CASE=attn_output_a run DS4_V9_NS=3 DS4_V6_PRE=2
V=0,6 CASE=output run X=1
} 2>&1 | tee $OUT/sweep.txt
