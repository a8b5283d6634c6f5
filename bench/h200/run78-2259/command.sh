set -u
# run 78: probes (wrong results by design) of what the IQ2_XXS decode's shared-memory reads cost in the gate+up
# launch: P1 = no header loads (index byte and sign/scale words made from a register instead), P2 = no sign-table
# lookup, P3 = both; alternated with the unchanged kernels (build 0) in one call. DS4_V6_DIAG=2: no weight loads at
# all (decode only), =1: no decode (loads only).
build() { cmake -S spark_setup/engine -B /tmp/v$1 -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 "-DCMAKE_CUDA_FLAGS=$2" > /tmp/v$1.log 2>&1 && cmake --build /tmp/v$1 -j 4 --target bench_matvec >> /tmp/v$1.log 2>&1 || { echo "build $1 failed"; tail -5 /tmp/v$1.log; }; }
build 0 "" & build P1 "-DDS4_IQ2_PROBE=1" & build P2 "-DDS4_IQ2_PROBE=2" & build P3 "-DDS4_IQ2_PROBE=3" & wait
row() { echo "== $1 diag=$2"; DS4_V6_DIAG=$2 /tmp/v$1/bench_matvec --iters 200 --versions 0 --case "gate+up launch only" 2>&1 | grep -E "^\| [^|]* \| v0 \| [A-Z]" | cut -d'|' -f2,10,12,13; }
for r in 1 2 3; do for v in 0 P1 P2 P3; do row $v 0; done; done > $OUT/ab.txt
for r in 1 2; do for v in 0 P1 P3; do row $v 2; done; row 0 1; done >> $OUT/ab.txt
cat $OUT/ab.txt
