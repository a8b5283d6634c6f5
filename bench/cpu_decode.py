#!/usr/bin/env python3
"""CPU decode throughput of the engine on the tiny DS4 models (a regression baseline, not a goal).

For each tiny config: prefill PROMPT tokens, then decode STEPS tokens one at a time (greedy), timing the decode
loop (wall clock, median of REPEATS runs); round-trips ON (the default) and OFF. Prints a markdown table.

usage: .venv/bin/python bench/cpu_decode.py [--lib path/to/libds4engine.so] [--steps 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import make_tiny_model as mt  # noqa: E402
from spark_setup.engine import _lib, runtime  # noqa: E402


def bench_one(lib, path, prompt, steps, roundtrip):
    with runtime.Model(path, lib=lib) as m, m.new_session(len(prompt) + steps + 1, roundtrip=roundtrip) as s:
        t0 = time.perf_counter()
        logits = s.eval(prompt)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = s.eval([int(logits.argmax())])
        t_decode = time.perf_counter() - t0
        return len(prompt) / t_prefill, steps / t_decode, s.nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", help="engine library (default: $DS4_ENGINE_LIB or the built engine)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    lib = _lib.load(args.lib)
    rng = np.random.default_rng(0)
    print(f"engine: {lib.ds4_version_string().decode()}; host: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"prompt {args.prompt}, decode {args.steps} steps, median of {args.repeats}\n")
    print("| model | weights | round-trips | prefill tok/s | decode tok/s | session bytes |")
    print("|---|---|---|---|---|---|")
    for name in mt.CONFIGS:
        path = mt.ensure_gguf(name, 0)
        with runtime.Model(path, lib=lib) as m:
            wbytes, V = m.desc["weight_bytes"], m.n_vocab
        prompt = rng.integers(0, V, size=args.prompt).tolist()
        for rt in (True, False):
            runs = [bench_one(lib, path, prompt, args.steps, rt) for _ in range(args.repeats)]
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            print(f"| {name} | {wbytes / 1e6:.1f} MB | {'on' if rt else 'off'} | {pre:.1f} | {dec:.1f} | "
                  f"{runs[0][2]:,} |")


if __name__ == "__main__":
    main()
