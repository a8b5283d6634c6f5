#!/usr/bin/env bash
# tools/gpu_model_check.sh: the one command for a GPU machine (the lead's H200 call). In order:
#   1. tools/gpu_check.sh: build the engine (CUDA + CPU) for this GPU, CUDA quant kernels vs CPU, matvec bench;
#   2. tests/test_forward_cuda.py: CUDA forward pass vs the CPU engine on the tiny models (logits at every
#      position, round-trips off and on, truncate == fresh, graphs == direct launches, errors);
#   3. the full-size synthetic Q2 GGUF (tools/synthetic_q2_gguf.py) written to $SYNTH (default /dev/shm), timed;
#   4. tools/bench_decode.py on it: bandwidth probe, load, prefill/decode t/s at 2048/8192/16384/32768/65536 until
#      the time budget is spent.
# Needs: python3 + numpy + pytest, nvcc, cmake; the carried folder $DS4_GPU_MODELS (default .cache/gpu-models,
# written by tools/gpu_model_files.py: s6/m8/k7 tiny GGUFs + tokenizer.json). Results: $OUT (device runner) or
# bench/gpu_model_check/; the model parts under $OUT/model/.
# Env: BUDGET_S (default 540: total wall seconds for the whole script; the benchmark stops before it),
#      STEPS (default 1234: which steps run; e.g. STEPS=12 then STEPS=34 to split over two calls; without step 1
#      the engine is still built, incrementally, into the same build dir), KEEP_SYNTH=1 (leave the 81 GiB file
#      for a later call), ITERS (matvec bench iterations, default 100).
set -uo pipefail

main() {
    local repo out mo cc arch bd lib models synth status=0 t0=$SECONDS budget
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    out=${OUT:-$repo/bench/gpu_model_check}
    mo=$out/model
    mkdir -p "$mo"
    cd "$repo" || exit 1
    budget=${BUDGET_S:-540}
    models=${DS4_GPU_MODELS:-$repo/.cache/gpu-models}
    synth=${SYNTH:-/dev/shm/ds4-synth-q2.gguf}

    local steps=${STEPS:-1234} batch_ok=1 gemm_ok=0
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    arch=${ARCH:-$cc}
    bd=$repo/build/gpu-sm_$arch
    lib=$bd/libds4engine.so
    if [[ $steps == *1* ]]; then
        echo "== [1] build + kernel checks + matvec bench (tools/gpu_check.sh)"
        OUT=$out ITERS=${ITERS:-100} bash tools/gpu_check.sh || status=1
    else
        echo "== [1] skipped (STEPS=$steps): build only -> $bd"
        local nvcc gen=Ninja
        nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
        command -v ninja >/dev/null 2>&1 || gen="Unix Makefiles"
        { cmake -S spark_setup/engine -B "$bd" -G "$gen" -DCMAKE_BUILD_TYPE=Release -DDS4_CUDA=ON \
              -DDS4_CUDA_ARCH="$arch" -DDS4_ARCH_NAME="sm_$arch" -DCMAKE_CUDA_COMPILER="$nvcc" &&
          cmake --build "$bd" -j "$(nproc)"; } >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
    fi
    if [ ! -f "$lib" ]; then
        echo "gpu_model_check: no engine library at $lib (build failed); see $out/build.log" >&2
        exit 1
    fi
    echo "   step 1 done at $((SECONDS - t0)) s"

    if [[ $steps == *2* ]]; then
    echo "== [2] CUDA forward vs CPU engine on the tiny models"
    for m in s6 m8 k7; do
        if [ ! -f "$models/$m.gguf" ]; then
            echo "gpu_model_check: $models/$m.gguf is missing: run tools/gpu_model_files.py where the gguf package" \
                 "is installed and carry .cache/gpu-models" >&2
            exit 1
        fi
    done
    rm -f "$mo/cuda_vs_cpu.json"
    if ! DS4_ENGINE_LIB=$lib DS4_GPU_MODELS=$models DS4_CUDA_REPORT=$mo/cuda_vs_cpu.json \
         timeout 300 python3 -m pytest -q -s -m gpu -p no:cacheprovider -o addopts= tests/test_forward_cuda.py \
         >"$mo/test_forward_cuda.txt" 2>&1; then
        status=1
        echo "   FAILED (tail of $mo/test_forward_cuda.txt):"
        tail -40 "$mo/test_forward_cuda.txt"
    else
        tail -3 "$mo/test_forward_cuda.txt"
    fi
    [ -f "$mo/cuda_vs_cpu.json" ] && cat "$mo/cuda_vs_cpu.json"
    # the batched prefill (DS4_CUDA_PREFILL_BATCH) is used by the benchmark only if its tests passed
    if grep -Eq 'FAILED.*(batched|truncate_equals_fresh.*16)' "$mo/test_forward_cuda.txt" ||
       ! grep -Eq '[0-9]+ passed' "$mo/test_forward_cuda.txt"; then
        batch_ok=0
    fi
    # the version-2 batched prefill (DS4_CUDA_PREFILL_GEMM=1) likewise, on its own tests
    if ! grep -Eq 'FAILED.*gemm' "$mo/test_forward_cuda.txt" && grep -Eq '[0-9]+ passed' "$mo/test_forward_cuda.txt"; then
        gemm_ok=1
    fi
    echo "   batched prefill v1 (BATCH<=16) tests ok: $batch_ok; v2 (PREFILL_GEMM=1) tests ok: $gemm_ok"
    echo "   step 2 done at $((SECONDS - t0)) s"
    fi

    if [[ $steps != *3* && $steps != *4* ]]; then
        echo "== gpu_model_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) (STEPS=$steps); results in $out"
        return $status
    fi

    echo "== [3] synthetic full-size Q2 GGUF -> $synth"
    df -h "$(dirname "$synth")" | tail -1
    free -g | head -2
    local want=86714775900 have free_kb
    have=$(stat -c %s "$synth" 2>/dev/null || echo 0)
    if [ "$have" -lt "$want" ]; then
        rm -f "$synth"
        free_kb=$(df -Pk "$(dirname "$synth")" | awk 'NR==2 {print $4}')
        if [ "$free_kb" -lt $((want / 1024 + 1048576)) ]; then
            echo "gpu_model_check: $(dirname "$synth") has $((free_kb / 1048576)) GiB free; the synthetic model" \
                 "needs 81 GiB (set SYNTH=/path/on/a/bigger/fs)" >&2
            df -h "$(dirname "$synth")" >&2
            exit 1
        fi
        local g0=$SECONDS
        if ! timeout $(( budget - (SECONDS - t0) - 60 > 60 ? budget - (SECONDS - t0) - 60 : 60 )) python3 tools/synthetic_q2_gguf.py "$synth" \
                --tokenizer "$models/tokenizer.json" --workers "$(nproc)" >"$mo/synthetic.log" 2>&1; then
            echo "gpu_model_check: synthetic generation failed or ran out of time; log:" >&2
            tail -20 "$mo/synthetic.log" >&2
            rm -f "$synth"
            exit 1
        fi
        echo "   generated $(stat -c %s "$synth") B in $((SECONDS - g0)) s" | tee "$mo/synthetic_time.txt"
    else
        echo "   reusing $synth ($have B)"
    fi
    echo "   step 3 done at $((SECONDS - t0)) s"

    if [[ $steps != *4* ]]; then
        echo "== gpu_model_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) (STEPS=$steps, file kept)"
        return $status
    fi
    echo "== [4] full-size benchmark (deadline: $((budget - (SECONDS - t0) - 20)) s from now)"
    # the walk over the contexts uses the v2 prefill when its tests passed (else v1 steps of 16, else 1);
    # DS4_CUDA_PREFILL_BATCH / DS4_CUDA_PREFILL_GEMM in the environment override. Before the walk, the prefill of
    # the first 2048 tokens is timed in fresh sessions for each config of COMPARE (BATCH:GEMM,...).
    local batch gemm old compare
    old=$([ $batch_ok = 1 ] && echo 16 || echo 1)
    if [ -n "${DS4_CUDA_PREFILL_BATCH:-}" ]; then
        batch=$DS4_CUDA_PREFILL_BATCH gemm=${DS4_CUDA_PREFILL_GEMM:-0}
    elif [ $gemm_ok = 1 ]; then
        batch=${GEMM_BATCH:-256} gemm=1
    else
        batch=$old gemm=0
    fi
    compare=${COMPARE:-$old:0$([ $gemm_ok = 1 ] && echo ,64:1,256:1)}
    echo "   prefill steps of $batch token(s) (DS4_CUDA_PREFILL_BATCH), DS4_CUDA_PREFILL_GEMM=$gemm; compare: $compare"
    if ! DS4_CUDA_PREFILL_BATCH=$batch DS4_CUDA_PREFILL_GEMM=$gemm python3 tools/bench_decode.py "$synth" --lib "$lib" \
            --out "$mo" --compare "$compare" \
            --deadline-s $((budget - (SECONDS - t0) - 20)) 2>&1 | tee "$mo/bench_decode.txt"; then
        status=1
    fi
    [ "${KEEP_SYNTH:-0}" = 1 ] || rm -f "$synth"
    echo "== gpu_model_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - t0)) s; results in $out"
    return $status
}

main "$@"
