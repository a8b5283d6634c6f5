set -u
# run 81: x by the bulk-copy engine (TMA, cp.async.bulk + mbarrier) into a staging area for launches that issue
# weight loads before their PDL wait (plain Q8_0, the paired / grouped expert-row Q8_0, the Q2_K down launch), so
# that x's requests do not queue behind those cp.async loads; against HEAD (tools/gpu_ab.sh: gpu_check first), then
# the GPU model tests (forward pass vs the CPU engine).
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
mkdir -p /tmp/gab; OUT=/tmp/gab PYTHONPATH=/tmp/ggp CASES="attn_q_b attn_output output Q2 shared" ROUNDS=3 bash tools/gpu_ab.sh ab_old > /tmp/gab/run.log 2>&1; echo "gpu_ab rc=$?"
grep -E "types pass|FAIL" /tmp/gab/gc.log | head -8; cp /tmp/gab/ab.txt /tmp/gab/kernels.md $OUT/; cat /tmp/gab/ab.txt
mkdir -p /tmp/mc; OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > /tmp/mc.log 2>&1; echo "model check rc=$?"; tail -3 /tmp/mc.log; cp /tmp/mc.log $OUT/mc.log
