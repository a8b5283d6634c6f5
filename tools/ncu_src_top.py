#!/usr/bin/env python3
"""Summarize an Nsight Compute source page (per-SASS-instruction stall sampling) for bench/ records.

On the GPU machine:
    ncu -k regex:matvec6 --launch-skip 5 --launch-count 1 --section SourceCounters -o /tmp/rep \\
        build/gpu-sm_90/bench_matvec --iters 3 --versions 0 --case "attn_q_b"
    ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 tools/ncu_src_top.py src.csv --top 30
Prints the instructions with the most stall samples (share, times executed, top reasons), the samples and
executions per opcode, then the instructions grouped by how often each ran (an inner loop against start-up code).
python3 only.
"""
import argparse
import collections
import csv
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=30, help="instructions to list (default 30)")
    a = ap.parse_args(argv)
    try:
        with open(a.csv, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        sys.exit(f"ncu_src_top: cannot read {a.csv}: {e}")
    hi = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if hi is None:
        sys.exit(f"ncu_src_top: {a.csv}: no 'Address' header row (not an ncu source-page CSV?)")
    hdr = rows[hi]
    data = [r for r in rows[hi + 1:] if len(r) == len(hdr)]
    need = ("Warp Stall Sampling (All Samples)", "Instructions Executed")
    missing = [h for h in need if h not in hdr]
    if missing:
        sys.exit(f"ncu_src_top: {a.csv}: no column {missing[0]!r} (profile with --section SourceCounters)")
    i_s, i_e = hdr.index(need[0]), hdr.index(need[1])
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "(Not" not in h]

    def num(r, i):
        try:
            return float(r[i].replace(",", "") or 0)
        except ValueError:
            return 0.0

    tot = sum(num(r, i_s) for r in data) or 1.0
    kname = rows[0][1] if rows and len(rows[0]) > 1 else "?"
    print(f"{kname}\n{len(data)} SASS instructions, {tot:.0f} stall samples")
    print("share  executed  instruction | top stall reasons (samples)")
    for r in sorted(data, key=lambda r: -num(r, i_s))[: a.top]:
        rs = sorted(((num(r, i), hdr[i][6:]) for i in reasons), reverse=True)[:3]
        top = ", ".join(f"{n} {v:.0f}" for v, n in rs if v > 0)
        print(f"{num(r, i_s) / tot * 100:5.1f}% {r[i_e]:>9}  {r[1].strip()[:60]:60s} | {top}")
    by_s, by_e = collections.Counter(), collections.Counter()
    for r in data:
        ops = [o for o in r[1].split() if not o.startswith("@")]
        op = ops[0].split(".")[0] if ops else "?"
        by_s[op] += num(r, i_s)
        by_e[op] += num(r, i_e)
    te = sum(by_e.values()) or 1.0
    print("\nopcode     samples  executed")
    for op, v in by_s.most_common(20):
        print(f"{op:10s} {v / tot * 100:6.1f}% {by_e[op] / te * 100:8.1f}%")
    # Instructions grouped by how often each ran: the inner loop's share against code that runs once per warp or
    # once per chunk (a kernel's start-up and bookkeeping), in executions and in stall samples (warp time).
    by_n = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for r in data:
        n = num(r, i_e)
        if n:
            g = by_n[n]
            g[0] += 1
            g[1] += n
            g[2] += num(r, i_s)
    print("\nruns per instruction  instructions  executed  samples")
    for n, (k, e, sm) in sorted(by_n.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{n:20.0f} {k:13d} {e / te * 100:8.1f}% {sm / tot * 100:7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
