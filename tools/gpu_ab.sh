#!/usr/bin/env bash
# tools/gpu_ab.sh: the matvec benchmark of a baseline engine and of this working tree, alternating, in one call on a
# machine with an NVIDIA GPU. The same code moves 2-3 points between device calls (bench/kernels.md, "Session 6"), so
# a kernel change is judged only against its baseline measured in the same call.
#   here:   rm -rf ab_old && mkdir ab_old && git archive <rev> spark_setup/engine | tar -x -C ab_old
#           (ab_old/ stays untracked and not ignored, so that the device runner copies it with the working tree)
#   there:  CASES="attn_q_b routed" ROUNDS=3 bash tools/gpu_ab.sh ab_old
# It first runs tools/gpu_check.sh on the working tree (build, kernel checks, benchmark), and builds the baseline
# beside it meanwhile. Env: CASES (bench_matvec --case substrings without spaces, space-separated; default
# "attn_q_b attn_output output shared routed"), ROUNDS (alternations, default 2), DIAGS (DS4_V6_DIAG values for extra rows of the working tree's build,
# e.g. "16 32"; default none), ITERS (gpu_check's benchmark iterations, default 20), ARCH (as gpu_check.sh).
# Results go to $OUT when set (the device runner), else to bench/gpu_ab/: gpu_check's files and ab.txt, one line per
# case and build: case | graph µs | graph % of copy | max rel diff vs CPU. Exit status: 0 only if all passed.
set -uo pipefail

main() {
    local repo old out cc arch nvcc gen ob nb status=0 c r d
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [ $# -ne 1 ]; then
        echo "usage: tools/gpu_ab.sh OLD_TREE (a directory holding the baseline's spark_setup/engine; see the header)" >&2
        exit 2
    fi
    old=$(cd "$1" 2>/dev/null && pwd) || { echo "gpu_ab: no directory $1" >&2; exit 2; }
    if [ ! -f "$old/spark_setup/engine/CMakeLists.txt" ]; then
        echo "gpu_ab: $1/spark_setup/engine/CMakeLists.txt not found (make the tree with git archive, see the header)" >&2
        exit 2
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_ab: no NVIDIA GPU here (nvidia-smi failed)" >&2
        exit 2
    fi
    out=${OUT:-$repo/bench/gpu_ab}
    mkdir -p "$out"
    cd "$repo" || exit 1
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    arch=${ARCH:-$cc}
    nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
    gen="Unix Makefiles"
    command -v ninja >/dev/null 2>&1 && gen=Ninja
    ob=/tmp/gpu_ab_old
    (cmake -S "$old/spark_setup/engine" -B "$ob" -G "$gen" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON \
        -DDS4_CUDA_ARCH="$arch" -DDS4_ARCH_NAME="sm_$arch" ${nvcc:+-DCMAKE_CUDA_COMPILER="$nvcc"} &&
        cmake --build "$ob" -j "$(nproc)") >"$out/old_build.log" 2>&1 &
    local old_pid=$!

    echo "== tools/gpu_check.sh on the working tree"
    ARCH=$arch ITERS=${ITERS:-20} OUT=$out bash tools/gpu_check.sh >"$out/gc.log" 2>&1 || status=1
    grep -E "types pass|FAIL|DS4_MATVEC_VERSION" "$out/gc.log"
    if ! wait "$old_pid"; then
        echo "gpu_ab: the baseline did not build; log: $out/old_build.log" >&2
        tail -20 "$out/old_build.log" >&2
        exit 1
    fi
    nb=build/gpu-sm_$arch/bench_matvec
    [ -x "$nb" ] || { echo "gpu_ab: $nb missing (gpu_check failed; log: $out/gc.log)" >&2; exit 1; }

    row() {  # label, binary, diag, case
        echo "== $1 (DS4_V6_DIAG=$3) $4"
        DS4_V6_DIAG=$3 "$2" --iters 200 --versions 0 --case "$4" 2>&1 | grep -E "^\| [^|]* \| v0 \| [A-Z]" |
            cut -d'|' -f2,10,12,13
    }
    local cases=${CASES:-attn_q_b attn_output output shared routed}
    for c in $cases; do
        for ((r = 0; r < ${ROUNDS:-2}; r++)); do
            row baseline "$ob/bench_matvec" 0 "$c"
            row "working tree" "$nb" 0 "$c"
            for d in ${DIAGS:-}; do row "working tree" "$nb" "$d" "$c"; done
        done
    done | tee "$out/ab.txt"
    return $status
}

main "$@"
