set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
B=build/gpu-sm_90/bench_matvec
run() { echo "== $*"; env "$@" $B --iters 200 --versions $V --case "$CASE" 2>&1 | grep -E "^\| $CASE" | cut -d'|' -f2,3,10,12,13; }
{
V=0,7 CASE=attn_ run X=1
V=0 CASE=output run X=1
V=0 CASE=shared run X=1
for cfg in "3 1" "3 2" "2 1"; do set -- $cfg; V=9 CASE=attn_q_b run DS4_V9_NS=$1 DS4_V6_PRE=$2; done
V=9 CASE=attn_q_b run DS4_V9_NS=3 DS4_V6_PRE=1 DS4_V6_DIAG=8
V=9 CASE=output run DS4_V9_NS=3 DS4_V6_PRE=1
} 2>&1 | tee $OUT/sweep.txt
DS4_MATVEC_VERSION=9 DS4_V9_NS=3 DS4_V6_PRE=1 PYTHONPATH=/tmp/ggp python3 tools/gpu_check.py --lib build/gpu-sm_90/libds4engine.so 2>&1 | tail -1
