set -u
# run 70: x first. ncu (run 69) put 17% of attn_q_b's stall samples (8% of gate+up's) on the first use of x after the
# PDL wait: x's load queues behind the weight loads already in flight. DS4_V6_XF loads x before any weight load that
# need not precede it. Plain Q8_0, 16 warps: 1 = 2 stages, 1 before the wait (the control: the same order as 0);
# 2 = 2 stages, none before; 3 = 3 stages, 1 before, 1 after the x load; 4 = 3 stages, none before. IQ2_XXS gate+up
# (12 warps): x loaded right after the wait, before the expert ids and the first weight loads. Three rounds, alternating.
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
B=build/gpu-sm_90
{ cmake -S spark_setup/engine -B $B -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 && cmake --build $B -j16; } > /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
for x in 1 2 3 4; do echo "-- DS4_V6_XF=$x"; DS4_V6_XF=$x PYTHONPATH=/tmp/ggp timeout 200 python3 tools/gpu_check.py --lib $B/libds4engine.so 2>&1 | grep -E "FAIL|types pass"; done | tee $OUT/check_xf.txt
r() { echo "$1 xf=$2 $(DS4_V6_XF=$2 $B/bench_matvec --iters 200 --versions 0 --case "$1" 2>&1 | grep -E '^\| (attn|output|routed)' | grep ' v0 ' | grep -v grouped | cut -d'|' -f10,12 | head -1)"; }
for k in 1 2 3; do
  for x in 0 1 2 3 4; do r attn_q_b $x; r attn_output_a $x; r "output head" $x; done
  for x in 0 1; do r "gate+up launch only" $x; r "routed experts, Q2" $x; done
done 2>&1 | tee $OUT/ab.txt
