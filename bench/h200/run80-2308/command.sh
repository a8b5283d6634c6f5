set -u
# run 80: the IQ2_XXS table's loads before the PDL wait, its stores after the x and id loads (were: loads and stores
# before the wait) against HEAD (tools/gpu_ab.sh, which runs gpu_check.sh first: 7 types, defaults and v6/v7/v9).
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
mkdir -p /tmp/gab; OUT=/tmp/gab PYTHONPATH=/tmp/ggp CASES="Q2 attn_q_b" ROUNDS=3 bash tools/gpu_ab.sh ab_old > /tmp/gab/run.log 2>&1; echo "gpu_ab rc=$?"
grep -E "types pass|FAIL" /tmp/gab/gc.log | head -8; cp /tmp/gab/ab.txt /tmp/gab/kernels.md $OUT/; cat /tmp/gab/ab.txt
