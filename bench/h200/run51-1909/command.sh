set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
DS4_V6_W12=1 PYTHONPATH=/tmp/ggp python3 tools/gpu_check.py --lib build/gpu-sm_90/libds4engine.so 2>&1 | tail -1
B=build/gpu-sm_90/bench_matvec
run() { echo "== $*"; env "$@" $B --iters 200 --versions $V --case "$CASE" 2>&1 | grep -E "^\| $CASE" | cut -d'|' -f2,3,10,12,13; }
{
V=6 CASE=routed run X=1
V=6 CASE=routed run DS4_V6_W12=1
V=6 CASE=routed run DS4_V6_W12=1 DS4_V6_KS=2
V=6 CASE=routed run DS4_V6_KS=2
V=6 CASE=routed run DS4_V6_KS=1
V=6 CASE=routed run DS4_V6_W12=1 DS4_V6_DIAG=2
V=6 CASE=routed run DS4_V6_W12=1 DS4_V6_DIAG=1
} 2>&1 | tee $OUT/sweep.txt
