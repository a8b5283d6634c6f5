#!/usr/bin/env bash
# tools/gpu_check.sh: on a machine with an NVIDIA GPU, in one command:
#   1. build the engine (CUDA + CPU) for that GPU with CMake (no Python package needed),
#   2. check the CUDA quant kernels against the CPU kernels and, when importable, the gguf package's reference
#      (tools/gpu_check.py: python3 + numpy only),
#   3. run the matvec benchmark at the real DS4 shapes against the device-to-device copy bandwidth.
# Results go to $OUT when set (the device runner), else to bench/gpu_check/. Exit status: 0 only if all passed.
# Env: ARCH=90|121|... overrides the detected compute capability; ITERS (default 200) for the benchmark.
set -uo pipefail

main() {
    local repo out cc arch nvcc gen jobs bd status=0
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    out=${OUT:-$repo/bench/gpu_check}
    mkdir -p "$out"
    cd "$repo" || exit 1

    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    arch=${ARCH:-$cc}
    nvcc=$(command -v nvcc || true)
    for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
        [ -z "$nvcc" ] && [ -x "$c" ] && nvcc=$c
    done
    if [ -z "$nvcc" ]; then
        echo "gpu_check: nvcc not found (install the CUDA toolkit or put it on PATH)" >&2
        exit 2
    fi
    "$nvcc" --version | tail -2 | tee -a "$out/gpu.txt"
    gen="Unix Makefiles"
    command -v ninja >/dev/null 2>&1 && gen=Ninja
    jobs=$(nproc 2>/dev/null || echo 4)
    bd=$repo/build/gpu-sm_$arch

    echo "== build (sm_$arch, $gen, -j$jobs) -> $bd"
    local t0=$SECONDS
    if ! { timeout 420 cmake -S spark_setup/engine -B "$bd" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
              -DDS4_CUDA=ON -DDS4_CUDA_ARCH="$arch" -DDS4_ARCH_NAME="sm_$arch" -DCMAKE_CUDA_COMPILER="$nvcc" &&
           timeout 420 cmake --build "$bd" -j "$jobs"; } >"$out/build.log" 2>&1; then
        echo "gpu_check: build failed; log: $out/build.log" >&2
        tail -30 "$out/build.log" >&2
        exit 1
    fi
    echo "built in $((SECONDS - t0)) s"

    echo "== kernel check (CUDA vs CPU vs gguf reference): default kernels, then every version forced"
    local v
    for v in 0 6 7 9; do
        echo "-- DS4_MATVEC_VERSION=$v"
        if ! DS4_MATVEC_VERSION=$v timeout 300 python3 tools/gpu_check.py --lib "$bd/libds4engine.so" 2>&1 |
                tee -a "$out/kernel_check.txt"; then
            status=1
        fi
    done

    echo "== matvec benchmark"
    if ! timeout 300 "$bd/bench_matvec" --iters "${ITERS:-200}" --csv "$out/matvec.csv" 2>&1 | tee "$out/kernels.md"; then
        status=1
    fi
    echo "== gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL); results in $out"
    return $status
}

main "$@"
