#!/usr/bin/env bash
# tools/gpu_serve_bench.sh MODEL.gguf LIB.so: on a GPU machine, serve MODEL with our OpenAI-compatible server on the
# CUDA engine LIB and measure it with `spark-setup bench` (llama-benchy's metrics) — the same client a Spark owner
# runs. Needs the package importable (PYTHONPATH=<repo>:<site with the runtime deps>). Results: $OUT (or bench/).
# Env: DEPTHS (default "0 4096"), DEEP (default 16384: one more depth run under its own time limit), PORT (8000),
# BENCH_TIMEOUT (seconds per bench command, default 150). Prefill settings (DS4_CUDA_PREFILL_*) pass to the server.
set -uo pipefail

main() {
    local model=$1 lib=$2 out=${OUT:-bench/gpu_serve_bench} port=${PORT:-8000} pid status=0
    mkdir -p "$out"
    export DS4_ENGINE_LIB=$lib
    echo "== serve $model on the CUDA engine (prefill: batch=${DS4_CUDA_PREFILL_BATCH:-default} gemm=${DS4_CUDA_PREFILL_GEMM:-default})"
    python3 -m spark_setup serve --foreground --model "$model" --backend cuda --port "$port" --ctx 24576 \
        --state-dir /tmp/ss-state >"$out/serve.log" 2>&1 &
    pid=$!
    local t0=$SECONDS
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then echo "server exited:"; tail -20 "$out/serve.log"; return 1; fi
        if [ $((SECONDS - t0)) -gt 240 ]; then echo "server not ready after 240 s"; tail -20 "$out/serve.log"; kill "$pid"; return 1; fi
        sleep 1
    done
    echo "   ready (loaded + first token) in $((SECONDS - t0)) s"
    curl -s "http://127.0.0.1:$port/health" | head -c 600; echo
    echo "== spark-setup bench, depths ${DEPTHS:-0 4096}"
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-150}" python3 -m spark_setup bench --url "http://127.0.0.1:$port" --pp 2048 --tg 128 \
        --depth ${DEPTHS:-0 4096} --runs 1 --tokenizer "$model" -o "$out/bench.md" 2>&1 | tail -12 || status=1
    if [ -n "${DEEP:-16384}" ]; then
        echo "== spark-setup bench, depth ${DEEP:-16384}"
        timeout "${BENCH_TIMEOUT:-150}" python3 -m spark_setup bench --url "http://127.0.0.1:$port" --pp 2048 --tg 128 \
            --depth "${DEEP:-16384}" --runs 1 --tokenizer "$model" -o "$out/bench_deep.md" 2>&1 | tail -8 || status=1
    fi
    curl -s "http://127.0.0.1:$port/health" | head -c 600; echo
    kill -TERM "$pid"; wait "$pid"
    echo "   server exit status after SIGTERM: $?"
    return $status
}

main "$@"
