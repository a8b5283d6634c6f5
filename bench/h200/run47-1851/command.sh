set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=20 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL" $OUT/gc.log | head -8
B=build/gpu-sm_90/bench_matvec
run() { echo "== $*"; env "$@" $B --iters 200 --versions 9 --case $CASE 2>&1 | grep -E "^\| $CASE " | cut -d'|' -f3,10,12; }
{
CASE=attn_output_a
for cfg in "2 1" "3 2" "3 1" "4 3" "4 2" "4 1" "5 4" "5 2" "5 1" "6 5" "6 3" "6 1"; do set -- $cfg
  run DS4_V6_KS=1 DS4_V9_MINR=90 DS4_V9_NS=$1 DS4_V6_PRE=$2; done
for ns in 2 4 5; do run DS4_V6_DIAG=8 DS4_V6_KS=1 DS4_V9_MINR=90 DS4_V9_NS=$ns; done
CASE=attn_q_b
for cfg in "2 1" "3 2" "3 1" "4 1" "4 2"; do set -- $cfg; run DS4_V6_KS=1 DS4_V9_NS=$1 DS4_V6_PRE=$2; done
for ns in 2 3; do run DS4_V6_DIAG=8 DS4_V9_NS=$ns DS4_V6_KS=1; done
} 2>&1 | tee $OUT/sweep.txt
for ns in 3 5; do DS4_MATVEC_VERSION=9 DS4_V9_NS=$ns DS4_V6_PRE=1 DS4_V9_MINR=50 DS4_V6_KS=1 PYTHONPATH=/tmp/ggp python3 tools/gpu_check.py --lib build/gpu-sm_90/libds4engine.so 2>&1 | tail -1; done
