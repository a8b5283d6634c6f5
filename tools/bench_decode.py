#!/usr/bin/env python3
"""Decode / prefill benchmark of the CUDA engine on a full-size DS4 GGUF (e.g. the synthetic Q2 file of
tools/synthetic_q2_gguf.py), measured like platform-facts section 8 (ds4 on one H200):

  - pure-read device bandwidth (ds4_bandwidth_probe, same run) -> decode roofline;
  - load time of the weights into GPU memory, GPU memory after load and at each context;
  - prefill t/s over the 2048-token interval that ends at each context;
  - decode t/s of 128 greedy tokens starting at each context: (tokens - 1) / (last - first token time), the
    llama-benchy tg definition.

One session walks up the contexts (the decoded tokens stay in the context; the next prefill ends exactly at the
next context). A wall-clock deadline stops before a context that would not finish in time.
Needs only numpy + the engine (DS4_ENGINE_LIB or --lib).

    python3 tools/bench_decode.py /dev/shm/ds4-synth-q2.gguf --lib build/gpu-sm_90/libds4engine.so --out DIR
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# always-on bytes per token (ds4-model-facts.md G) + routed experts (Q2) + KV reads; F32 KV as stored here
ALWAYS_ON = 7_733_023_140
ROUTED_Q2 = 1_826_095_104
IDX_ONLY = 21 * 17_301_504  # indexer q_b/proj, skipped while <= top-k rows are visible (ctx < 2052)


def kv_bytes(ctx: int) -> int:
    raw = 43 * 128 * 512 * 4
    r4 = 21 * min(ctx // 4, 512) * 512 * 4
    idx = 21 * (ctx // 4) * 128 * 4 if ctx // 4 > 512 else 0
    r128 = 20 * (ctx // 128) * 512 * 4
    return raw + r4 + idx + r128


def bytes_per_token(ctx: int) -> int:
    return ALWAYS_ON + ROUTED_Q2 + kv_bytes(ctx) - (0 if ctx // 4 > 512 else IDX_ONLY)


# ds4 on one H200, same synthetic file (platform-facts section 8): ctx -> (prefill t/s, decode t/s)
DS4_H200 = {2048: (1350, 33.4), 8192: (1313, 32.2), 16384: (1246, 32.0), 32768: (1238, 29.3), 65536: (1004, 27.3)}


def compare_prefill(model, toks, interval: int, spec: str, deadline: float, roundtrip: bool = True) -> list:
    """Prefill toks[:interval] in a fresh session per config BATCH:GEMM[:MM6] (env read at session creation)."""
    keys = ("DS4_CUDA_PREFILL_BATCH", "DS4_CUDA_PREFILL_GEMM", "DS4_CUDA_MM6")
    saved = {k: os.environ.get(k) for k in keys}
    rows, ref = [], None
    try:
        for cfg in spec.split(","):
            batch, gemm, mm6 = (cfg.split(":") + ["0", "1"])[:3]
            done = [r for r in rows if "pp_tps" in r]
            if done and time.monotonic() + 2 * max(interval / r["pp_tps"] for r in done) + 10 > deadline:
                print(f"prefill compare {cfg}: skipped (deadline)", flush=True)
                continue
            os.environ[keys[0]], os.environ[keys[1]], os.environ[keys[2]] = batch, gemm, mm6
            try:
                with model.new_session(interval + 8, roundtrip=roundtrip) as s:
                    t = time.monotonic()
                    lg = s.eval(toks[:interval])
                    d = time.monotonic() - t
            except Exception as e:  # noqa: BLE001 - report it and keep measuring the other configs
                print(f"prefill compare {cfg}: FAILED: {e}", flush=True)
                rows.append({"batch": int(batch), "gemm": int(gemm), "mm6": int(mm6), "error": str(e)})
                continue
            rel = None if ref is None else float(np.abs(lg - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            if ref is None:
                ref = lg
            row = {"batch": int(batch), "gemm": int(gemm), "mm6": int(mm6), "pp_tps": interval / d, "finite": bool(np.isfinite(lg).all()),
                   "argmax": int(np.argmax(lg)), "rel_vs_first": rel}
            rows.append(row)
            print(f"prefill compare batch {batch} gemm {gemm} mm6 {mm6}: {row['pp_tps']:.1f} t/s over {interval} tokens "
                  f"(finite {row['finite']}, argmax {row['argmax']}, rel diff vs first {rel})", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


def gpu_mem_used_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return int(out[0]) / 1024.0
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--lib", type=Path, help="libds4engine.so built with CUDA (default: $DS4_ENGINE_LIB)")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "cpu"], help="cpu: to try the script on a tiny model")
    ap.add_argument("--contexts", default="2048,8192,16384,32768,65536")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--interval", type=int, default=2048, help="prefill chunk (tokens per eval call)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop before a context that would end later")
    ap.add_argument("--bw-gib", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=None, help="directory for bench.json / bench.md")
    ap.add_argument("--compare", default="", help="prefill configs BATCH:GEMM[:MM6],... (DS4_CUDA_PREFILL_BATCH, "
                    "DS4_CUDA_PREFILL_GEMM, DS4_CUDA_MM6 (default 1)), each timed over the first interval in a fresh session before the "
                    "walk; the last logits are compared with the first config's")
    ap.add_argument("--compare-no-roundtrip", action="store_true",
                    help="run the --compare sessions with the FP8/FP4/F16 round-trips off (f32 throughout), where "
                    "two prefill paths should agree to rounding; with them on, random weights amplify any difference")
    args = ap.parse_args(argv)
    for cfg in filter(None, args.compare.split(",")):
        if not all(f.isdigit() for f in cfg.split(":")) or len(cfg.split(":")) > 3:
            ap.error(f"--compare: {cfg!r} is not BATCH:GEMM[:MM6] (integers, e.g. 1024:1:1)")
    try:
        [int(c) for c in args.contexts.split(",")]
    except ValueError:
        ap.error(f"--contexts: {args.contexts!r} is not a comma-separated list of token counts")
    t_start = time.monotonic()
    deadline = t_start + args.deadline_s
    if args.lib:
        os.environ["DS4_ENGINE_LIB"] = str(args.lib)
    from spark_setup.engine import _lib
    from spark_setup.engine.runtime import Model

    lib = _lib.load()
    contexts = [int(c) for c in args.contexts.split(",")]
    # the engine's defaults when the variables are unset (cuda/forward.cu: batches of 1024 through the GEMM path)
    res: dict = {"prefill_batch": int(os.environ.get("DS4_CUDA_PREFILL_BATCH", "1024") or 1024),
                 "prefill_gemm": int(os.environ.get("DS4_CUDA_PREFILL_GEMM", "1") or 1),
                 "model": str(args.model), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "version": lib.ds4_version_string().decode(), "rows": []}

    rd, cp = ctypes.c_double(), ctypes.c_double()
    _lib.check(lib, lib.ds4_bandwidth_probe(1 if args.backend == "cuda" else 0, int(args.bw_gib * 2**30), 20, ctypes.byref(rd), ctypes.byref(cp)))
    res["read_gbs"], res["copy_gbs"] = rd.value, cp.value
    print(f"bandwidth: read {rd.value:.0f} GB/s, copy {cp.value:.0f} GB/s", flush=True)

    mem0 = gpu_mem_used_gib()
    t0 = time.monotonic()
    model = Model(args.model, backend=args.backend, lib=lib)
    res["load_s"] = time.monotonic() - t0
    res["weight_bytes"] = model.desc["weight_bytes"]
    res["file_bytes"] = args.model.stat().st_size
    res["load_gbs"] = res["file_bytes"] / res["load_s"] / 1e9
    res["gpu_mem_before_gib"], res["gpu_mem_loaded_gib"] = mem0, gpu_mem_used_gib()
    print(f"load: {res['load_s']:.1f} s ({res['load_gbs']:.1f} GB/s), GPU memory {res['gpu_mem_loaded_gib']} GiB",
          flush=True)

    max_ctx = max(contexts) + args.decode + 8
    rng = np.random.default_rng(1234)
    toks = rng.integers(1000, model.n_vocab - 1000, size=max_ctx).astype(np.int32)
    if args.compare:
        res["prefill_compare"] = compare_prefill(model, toks, args.interval, args.compare, deadline,
                                                   roundtrip=not args.compare_no_roundtrip)
        ok = [r for r in res["prefill_compare"] if "error" not in r and r["finite"]]
        if res["prefill_gemm"] and ok and any("error" in r or not r["finite"] for r in res["prefill_compare"]
                                               if r["gemm"]):
            # the v2 prefill failed on the full-size model: walk with the first config that worked
            os.environ["DS4_CUDA_PREFILL_BATCH"], os.environ["DS4_CUDA_PREFILL_GEMM"] = str(ok[0]["batch"]), str(ok[0]["gemm"])
            res["prefill_batch"], res["prefill_gemm"] = ok[0]["batch"], ok[0]["gemm"]
            print(f"WARNING: v2 prefill failed in the comparison; the walk uses batch {ok[0]['batch']} gemm "
                  f"{ok[0]['gemm']}", flush=True)
    sess = model.new_session(max_ctx)
    res["session_bytes"] = sess.nbytes
    per_tok = None  # seconds per prefill token, measured
    dec_tok = None  # seconds per decode token, measured
    logits = None
    for c in contexts:
        # would this context finish before the deadline?
        if per_tok is not None:
            need = (c - sess.pos) * per_tok + args.decode * (dec_tok or 4 * per_tok) * 1.2 + 5
            if time.monotonic() + need > deadline:
                print(f"ctx {c}: skipped (needs ~{need:.0f} s, deadline in {deadline - time.monotonic():.0f} s)",
                      flush=True)
                res.setdefault("skipped", []).append(c)
                continue
        pp_tps, last_n, last_dt = None, 0, 0.0
        while sess.pos < c:
            n = min(args.interval, c - sess.pos)
            p = sess.pos
            t = time.monotonic()
            logits = sess.eval(toks[p:p + n])
            d = time.monotonic() - t
            last_n, last_dt = n, d
            per_tok = d / n
            if time.monotonic() + (c - sess.pos) * per_tok > deadline:
                break
        if sess.pos < c:
            print(f"ctx {c}: stopped during prefill at {sess.pos} (deadline)", flush=True)
            res.setdefault("skipped", []).append(c)
            break
        pp_tps = last_n / last_dt if last_dt > 0 else None
        if logits is None or not np.isfinite(logits).all():  # keep timing, but say so (a bug, not a speed)
            res.setdefault("nonfinite_at", []).append(c)
            print(f"WARNING: non-finite logits after the prefill to {c}", flush=True)
        stamps = []
        tok = int(np.argmax(logits))
        for _ in range(args.decode):
            logits = sess.eval([tok])
            stamps.append(time.monotonic())
            tok = int(np.argmax(logits))
        if not np.isfinite(logits).all():
            res.setdefault("nonfinite_at", []).append(c + args.decode)
            print(f"WARNING: non-finite logits in the decode at {c}", flush=True)
        tg = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        dec_tok = 1.0 / tg
        bpt = bytes_per_token(c)
        row = {"ctx": c, "pp_tps": pp_tps, "pp_interval": last_n, "tg_tps": tg, "ms_per_token": 1000 / tg,
               "bytes_per_token": bpt, "roofline_tps": rd.value * 1e9 / bpt,
               "roofline_frac": tg / (rd.value * 1e9 / bpt), "gpu_mem_gib": gpu_mem_used_gib()}
        res["rows"].append(row)
        print(f"ctx {c}: prefill {pp_tps:.1f} t/s ({last_n} tok), decode {tg:.1f} t/s ({1000 / tg:.2f} ms/tok), "
              f"roofline {row['roofline_tps']:.0f} t/s -> {100 * row['roofline_frac']:.1f}%, "
              f"GPU mem {row['gpu_mem_gib']} GiB", flush=True)
    sess.close()
    # launch overhead: short-context decode with the CUDA graphs vs direct launches (fresh small sessions)
    if args.backend == "cuda" and time.monotonic() + 30 < deadline:
        short = {}
        for graphs in ("1", "0"):
            os.environ["DS4_CUDA_GRAPHS"] = graphs
            with model.new_session(256) as s2:
                s2.eval(toks[:64])
                t = time.monotonic()
                for tk in toks[64:96]:
                    s2.eval([int(tk)])
                short[graphs] = 32 / (time.monotonic() - t)
        os.environ.pop("DS4_CUDA_GRAPHS", None)
        res["short_decode_graphs_tps"], res["short_decode_direct_tps"] = short["1"], short["0"]
        print(f"short-context decode: {short['1']:.1f} t/s with CUDA graphs, {short['0']:.1f} t/s with direct "
              "launches", flush=True)
    model.close()
    res["wall_s"] = time.monotonic() - t_start

    lines = [f"| context | prefill t/s ({args.interval}-token interval) | ds4 prefill | decode t/s ({args.decode} "
             "greedy) | ds4 decode | ms/token | roofline t/s | % of roofline | GPU mem GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        d4 = DS4_H200.get(r["ctx"], (None, None))
        lines.append(f"| {r['ctx']} | {r['pp_tps']:.0f} | {d4[0] or '-'} | {r['tg_tps']:.1f} | {d4[1] or '-'} | "
                     f"{r['ms_per_token']:.2f} | {r['roofline_tps']:.0f} | {100 * r['roofline_frac']:.1f} | "
                     f"{r['gpu_mem_gib']} |")
    lines.append("")
    lines.append(f"Pure-read bandwidth {res['read_gbs']:.0f} GB/s (copy {res['copy_gbs']:.0f} GB/s); load "
                 f"{res['load_s']:.1f} s for {res['file_bytes'] / 2**30:.2f} GiB ({res['load_gbs']:.1f} GB/s); GPU "
                 f"memory {res['gpu_mem_loaded_gib']} GiB after load (before: {res['gpu_mem_before_gib']}); "
                 f"session {res['session_bytes'] / 2**20:.0f} MiB; {res['version']}; {res['date']}.")
    if res.get("nonfinite_at"):
        lines.append(f"WARNING: non-finite logits at {res['nonfinite_at']} (numbers are timings of a broken run).")
    if "short_decode_graphs_tps" in res:
        lines.append(f"Decode at context 64-96: {res['short_decode_graphs_tps']:.1f} t/s with CUDA graphs, "
                     f"{res['short_decode_direct_tps']:.1f} t/s with direct launches (launch overhead).")
    for r in res.get("prefill_compare", []):
        if "error" in r:
            lines.append(f"Prefill compare DS4_CUDA_PREFILL_BATCH={r['batch']} DS4_CUDA_PREFILL_GEMM={r['gemm']}: "
                         f"FAILED ({r['error']}).")
            continue
        lines.append(f"Prefill 0 -> {args.interval} in a fresh session, DS4_CUDA_PREFILL_BATCH={r['batch']} "
                     f"DS4_CUDA_PREFILL_GEMM={r['gemm']}: {r['pp_tps']:.0f} t/s (last logits: finite {r['finite']}, "
                     f"argmax {r['argmax']}, max rel diff vs the first config {r['rel_vs_first']}).")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(res, indent=1))
        head = [f"# DS4 decode on {gpu_name()} (CUDA engine, synthetic Q2 weights)", "",
                f"Measured {res['date']} by `python3 tools/bench_decode.py {' '.join(sys.argv[1:])}` (run by "
                "`tools/gpu_model_check.sh`). Weights: tools/synthetic_q2_gguf.py (the real Q2 layout, random tame "
                "values), loaded into GPU memory. Prefill: steps of "
                f"{res['prefill_batch']} token(s) (DS4_CUDA_PREFILL_BATCH; 1 = token by token through the decode "
                f"step), DS4_CUDA_PREFILL_GEMM={res['prefill_gemm']}. Decode t/s = (tokens - 1) / (last - first token time), greedy, logits copied to the "
                "host every token. Roofline = pure-read bandwidth / bytes read per token (ds4-model-facts G, F32 KV "
                "rows). ds4 columns: platform-facts section 8 (same synthetic file, same GPU kind).", ""]
        if res.get("skipped"):
            table += f"\n\nContexts skipped for the time budget: {res['skipped']}."
        (args.out / "h200_decode.md").write_text("\n".join(head) + "\n" + table + "\n")
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
