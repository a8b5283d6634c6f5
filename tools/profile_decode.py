#!/usr/bin/env python3
"""Per-kernel time of one CUDA decode step, for Nsight Compute (what a decode step spends its time on).

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 tools/profile_decode.py MODEL.gguf --lib build/gpu-sm_90/libds4engine.so [--ctx 64] > kernels.csv
    python3 tools/profile_decode.py --summarize kernels.csv

The script loads the model, prefills --ctx random tokens, times --steps decode steps (CUDA graphs, as served), then
runs one more step (or, with --prefill N, a prefill of N tokens) between cuProfilerStart and cuProfilerStop: under
ncu exactly that step's kernels are measured
(ncu profiles a graph's kernel nodes one by one, serialized, so the sum is kernel time without launch gaps or
overlap). --summarize folds the CSV by kernel name: count, total and mean time, share of the step.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


UNITS_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
COLUMNS = ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit", "Grid Size", "Block Size")


def summarize(path: Path) -> int:
    try:
        rows = [r for r in csv.reader(path.read_text(errors="replace").splitlines()) if len(r) > 5]
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror}", file=sys.stderr)
        return 2
    if not rows or any(c not in rows[0] for c in COLUMNS):
        print(f"error: {path} is not ncu's CSV (run ncu with --csv --log-file FILE, as in this script's help)",
              file=sys.stderr)
        return 2
    iname, imetric, ivalue, iunit, igrid, iblock = (rows[0].index(c) for c in COLUMNS)
    agg: dict[tuple, list[float]] = collections.defaultdict(list)
    for r in rows[1:]:
        if r[imetric] != "gpu__time_duration.sum" or r[iunit] not in UNITS_US:
            continue
        v = float(r[ivalue].replace(",", "")) * UNITS_US[r[iunit]]
        agg[(r[iname].split("(")[0][:90], r[igrid], r[iblock])].append(v)
    if not agg:
        print(f"error: {path} has no gpu__time_duration.sum rows (run ncu with --metrics gpu__time_duration.sum)",
              file=sys.stderr)
        return 2
    total = sum(sum(v) for v in agg.values())
    n = sum(len(v) for v in agg.values())
    print(f"{n} kernels, {total:.0f} us of kernel time in the profiled step\n")
    print("| kernel | grid | block | launches | total us | mean us | share |\n|---|---|---|---:|---:|---:|---:|")
    for (k, g, b), v in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
        print(f"| `{k}` | {g} | {b} | {len(v)} | {sum(v):.0f} | {sum(v) / len(v):.1f} | {100 * sum(v) / total:.1f}% |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--lib", default=os.environ.get("DS4_ENGINE_LIB"))
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0,
                    help="profile one prefill of this many tokens (after --ctx) instead of a decode step")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda", help="cpu: to try the script on a tiny model")
    ap.add_argument("--summarize", action="store_true", help="MODEL is a CSV written by ncu: fold it by kernel")
    a = ap.parse_args()
    if a.ctx < 0 or a.steps < 2 or a.prefill < 0:
        ap.error("--ctx and --prefill must be >= 0 and --steps >= 2")
    if a.summarize:
        return summarize(a.model)
    from spark_setup.errors import UserError

    try:
        return profile(a)
    except UserError as e:  # a missing or bad model, a wrong --lib: the engine's one-line message
        print(f"error: {e}", file=sys.stderr)
        return 1


def profile(a: argparse.Namespace) -> int:
    if a.lib:
        os.environ["DS4_ENGINE_LIB"] = a.lib
    from spark_setup.engine import _lib
    from spark_setup.engine.runtime import Model

    lib = _lib.load()
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        start, stop = cuda.cuProfilerStart, cuda.cuProfilerStop
    except OSError:  # no driver (--backend cpu on a machine without a GPU)
        start = stop = lambda: 0
    model = Model(a.model, backend=a.backend, lib=lib)
    lo = min(1000, model.n_vocab // 4)  # ordinary tokens, away from the special ones at either end
    n = a.ctx + a.steps + a.prefill + 8
    toks = np.random.default_rng(7).integers(lo, model.n_vocab - lo, size=n).astype(np.int32)
    with model.new_session(n) as s:
        logits = s.eval(toks[:a.ctx])
        tok = int(np.argmax(logits))
        t = []
        for _ in range(a.steps):
            logits = s.eval([tok])
            t.append(time.monotonic())
            tok = int(np.argmax(logits))
        ms = 1000 * (t[-1] - t[0]) / (len(t) - 1)
        print(f"decode at ctx {a.ctx}: {ms:.2f} ms/token ({1000 / ms:.1f} t/s)", file=sys.stderr)
        more = toks[a.ctx:a.ctx + a.prefill] if a.prefill else [tok]
        t0 = time.monotonic()
        start()
        s.eval(more)
        stop()
        print(f"profiled step: {1000 * (time.monotonic() - t0):.1f} ms wall (under the profiler)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
