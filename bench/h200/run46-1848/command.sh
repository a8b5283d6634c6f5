set -u
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
PYTHONPATH=/tmp/ggp ITERS=60 bash tools/gpu_check.sh > $OUT/gc.log 2>&1; echo "gpu_check rc=$?"; grep -E "types pass|FAIL|PASS" $OUT/gc.log | head -8
grep -A30 "^| case | v6 | v9" $OUT/kernels.md | grep -E "attn|head" ; grep -E "^\| (35|26|16|42)" $OUT/kernels.md
B=build/gpu-sm_90/bench_matvec
for cfg in "4 3" "6 5" ; do set -- $cfg
  DS4_MATVEC_VERSION=9 DS4_V9_NS=$1 DS4_V6_PRE=$2 DS4_V9_MINR=50 PYTHONPATH=/tmp/ggp python3 tools/gpu_check.py --lib build/gpu-sm_90/libds4engine.so 2>&1 | tail -1; done
for cfg in "2 1" "4 3" "4 2" "4 1" "6 5" "6 4" "6 3" "6 2" "6 1"; do set -- $cfg
  echo "== NS=$1 PRE=$2"; DS4_V9_NS=$1 DS4_V6_PRE=$2 DS4_V9_MINR=90 $B --iters 200 --versions 9 --case attn_ 2>&1 | grep -E "^\| attn_(q_b|output_a) " | cut -d'|' -f2,3,10,12
done 2>&1 | tee $OUT/sweep.txt
mkdir -p $OUT/mc; OUT=$OUT/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh 2>&1 | tail -2
