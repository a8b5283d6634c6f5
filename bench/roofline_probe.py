#!/usr/bin/env python3
"""Bandwidth probe + decode roofline on a GPU machine, with the Python standard library only.

The GPU machine has no project virtualenv, so this calls ds4_bandwidth_probe through ctypes directly and takes the
DS4 Q2 bytes-per-token table from bench/q2_bytes_per_token.json (written by `spark-setup roofline --json` on the
reference layout). Where the full package is importable, prefer `spark-setup roofline --backend cuda`.

usage: python3 bench/roofline_probe.py --lib build/gpu-sm_90/libds4engine.so [--gib 8] [--iters 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def probe(lib: ctypes.CDLL, backend: int, nbytes: int, iters: int) -> tuple[float, float]:
    rd, cp = ctypes.c_double(), ctypes.c_double()
    code = lib.ds4_bandwidth_probe(backend, ctypes.c_uint64(nbytes), ctypes.c_int32(iters), ctypes.byref(rd),
                                   ctypes.byref(cp))
    if code != 0:
        raise SystemExit(f"ds4_bandwidth_probe(backend={backend}) failed: {lib.ds4_last_error().decode()}")
    return rd.value, cp.value


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.mem", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--gib", type=float, default=8.0, help="probe footprint on the GPU (GiB)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu-gib", type=float, default=1.0, help="host-memory probe footprint (0 = skip)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE))
    a = ap.parse_args(argv)

    lib = ctypes.CDLL(a.lib)
    lib.ds4_bandwidth_probe.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int32,
                                        ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
    lib.ds4_last_error.restype = ctypes.c_char_p
    lib.ds4_version_string.restype = ctypes.c_char_p
    if not lib.ds4_has_cuda():
        raise SystemExit(f"{a.lib} was built without CUDA")
    table = json.loads((HERE / "q2_bytes_per_token.json").read_text())["bytes_per_token"]

    t0 = time.time()
    g_rd, g_cp = probe(lib, 1, int(a.gib * 2**30), a.iters)
    c_rd = c_cp = None
    if a.cpu_gib > 0:
        c_rd, c_cp = probe(lib, 0, int(a.cpu_gib * 2**30), 5)
    lines = [
        f"## Bandwidth probe and DS4 Q2 decode roofline ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- GPU: {gpu_name()}; engine {lib.ds4_version_string().decode()}; host {platform.machine()}",
        f"- command: `python3 bench/roofline_probe.py --lib {a.lib} --gib {a.gib:g} --iters {a.iters}`",
        f"- GPU read (16-byte streaming loads, {a.gib:g} GiB, median of {a.iters}): **{g_rd:.1f} GB/s**; "
        f"GPU copy (read + write counted): {g_cp:.1f} GB/s",
    ]
    if c_rd is not None:
        lines.append(f"- host read ({a.cpu_gib:g} GiB, all threads): {c_rd:.1f} GB/s; host copy: {c_cp:.1f} GB/s")
    lines += ["", "| ctx | bytes/token | roofline t/s (GPU read) |", "|---:|---:|---:|"]
    for ctx, bpt in sorted(table.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(ctx):,} | {bpt:,} | {g_rd * 1e9 / bpt:.1f} |")
    lines += ["", f"(probe took {time.time() - t0:.1f} s)", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline_gpu.md").write_text(text)
    (out / "roofline_gpu.json").write_text(json.dumps({"gpu": gpu_name(), "gpu_read_gbs": g_rd, "gpu_copy_gbs": g_cp,
                                                       "host_read_gbs": c_rd, "host_copy_gbs": c_cp,
                                                       "probe_gib": a.gib, "iters": a.iters,
                                                       "roofline_tps": {k: g_rd * 1e9 / v for k, v in table.items()}},
                                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
