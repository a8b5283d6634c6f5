set -u
# run 73: the Q2_K down launch (12 warps; its expert ids are settled, so its ring stages go out before the PDL wait)
# with x first and fewer stages before the wait: DS4_V6_DPRE=1 (1 of its 2 ahead stages before the wait, the other
# after the x loads), =0 (both after); unset = both before (c023ba7). Three rounds alternating; the bench checks
# every case against the CPU kernel (max rel diff column).
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
B=build/gpu-sm_90
{ cmake -S spark_setup/engine -B $B -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 && cmake --build $B -j16; } > /tmp/b.log 2>&1 || { tail -20 /tmp/b.log; exit 1; }
r() { echo "$1 dpre=$2 $(env $([ "$2" = d ] || echo DS4_V6_DPRE=$2) $B/bench_matvec --iters 200 --versions 0 --case "$1" 2>&1 | grep -E '^\| routed' | grep ' v0 ' | cut -d'|' -f10,12,13 | head -1)"; }
for k in 1 2 3; do for d in d 1 0; do r "down launch only" $d; r "routed experts, Q2" $d; done; done 2>&1 | tee $OUT/ab.txt
