set -u
# run 77: three candidate changes for the routed Q2 set, each in its own build, alternated with the unchanged
# kernels (build 0) in one call: A = the bench's gate+up launch with ids_settled (its weights stream before the wait,
# as the down launch's do), B = Q2_K with two mma accumulators (chains of 4 instead of 8), C = IQ2_XXS scale and
# upper-selector arithmetic on the FMA pipe (IMAD / IMAD.HI) instead of the ALU pipe; D = all three.
mkdir -p /tmp/ggp && cp -r .venv/lib/python3.11/site-packages/gguf /tmp/ggp/
build() { cmake -S spark_setup/engine -B /tmp/v$1 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 "-DCMAKE_CUDA_FLAGS=$2" > /tmp/v$1.log 2>&1 && cmake --build /tmp/v$1 -j 4 >> /tmp/v$1.log 2>&1 || { echo "build $1 failed"; tail -5 /tmp/v$1.log; }; }
build 0 "" & build A "-DDS4_BENCH_GU_SETTLED=1" & build B "-DDS4_Q2K_NACC=2" & build C "-DDS4_IQ2_ALU=1" & build D "-DDS4_BENCH_GU_SETTLED=1 -DDS4_Q2K_NACC=2 -DDS4_IQ2_ALU=1" & wait
for v in B C D; do for m in 0 7; do echo "-- $v v$m"; DS4_MATVEC_VERSION=$m PYTHONPATH=/tmp/ggp timeout 120 python3 tools/gpu_check.py --lib /tmp/v$v/libds4engine.so 2>&1 | grep -E "types pass|FAIL" | head -3; done; done | tee $OUT/check.txt
for r in 1 2 3; do for v in 0 A B C D; do echo "== $v"; /tmp/v$v/bench_matvec --iters 200 --versions 0 --case Q2 2>&1 | grep -E "^\| [^|]* \| v0 \| [A-Z]" | cut -d'|' -f2,10,12,13; done; done > $OUT/ab.txt; cat $OUT/ab.txt
