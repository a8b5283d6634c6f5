set -u
# run 75: the Q2_K down launch's ring depth in its 12- and 16-warp configurations (DS4_Q2K_NS_WIDE: 3 = e1919fb, 4, 5;
# NS - 1 stages go out before the PDL wait, and run 73 found 2 better than 1). Three builds, alternated three rounds;
# the bench checks every case against the CPU kernel.
GEN="Unix Makefiles"; command -v ninja >/dev/null && GEN=Ninja
for n in 3 4 5; do
  ( cmake -S spark_setup/engine -B /tmp/b$n -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON -DDS4_CUDA_ARCH=90 -DDS4_ARCH_NAME=sm_90 -DCMAKE_CUDA_FLAGS="-DDS4_Q2K_NS_WIDE=$n" > /tmp/b$n.log 2>&1 && cmake --build /tmp/b$n -j6 >> /tmp/b$n.log 2>&1 || tail -5 /tmp/b$n.log ) &
done; wait
r() { echo "$1 ns=$2 $(/tmp/b$2/bench_matvec --iters 200 --versions 0 --case "$1" 2>&1 | grep -E '^\| routed' | grep ' v0 ' | cut -d'|' -f10,12,13 | head -1)"; }
for k in 1 2 3; do for n in 3 4 5; do r "down launch only" $n; r "routed experts, Q2" $n; done; done 2>&1 | tee $OUT/ab.txt
