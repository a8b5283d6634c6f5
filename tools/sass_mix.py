#!/usr/bin/env python3
"""Instruction mix of the v6 matvec kernels, counted from SASS (no GPU needed): the numbers bench/kernels.md quotes.

    python3 tools/sass_mix.py [--arch 90] [--nvcc nvcc] [--cuobjdump cuobjdump]

Compiles spark_setup/engine/csrc/cuda/quant.cu for sm_<arch>, disassembles it, and for every matvec6 instantiation
prints the instructions per mma (the stretch from the first to the last IMMA of the function, divided by the IMMA
count: one mma = 16 weights per lane) and the most frequent opcodes in that stretch. cuobjdump ships with the CUDA
toolkit, or with the pip wheel nvidia-cuda-cuobjdump.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "spark_setup" / "engine" / "csrc"
TYPES = {"8": "Q8_0", "10": "Q2_K", "16": "IQ2_XXS"}
INSTR = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(.*?);")


def opcode(text: str) -> str:
    words = text.split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--nvcc", default="nvcc")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "quant.o"
        cmd = [a.nvcc, "-std=c++17", "-O3", f"-arch=sm_{a.arch}", "-DDS4_WITH_CUDA", "-I", str(CSRC), "-c",
               str(CSRC / "cuda" / "quant.cu"), "-o", str(obj)]
        try:
            subprocess.run(cmd, check=True)
            sass = subprocess.run([a.cuobjdump, "-sass", str(obj)], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"sm_{a.arch}: instructions per mma (16 weights per lane) in the main loops of matvec6")
    for func in re.split(r"\n\s+Function : ", sass):
        name = func.split("\n", 1)[0]
        m = re.search(r"matvec6ILi(\d+)ENS0_(\d+)(\w+?Rows)ELi(\d+)E", name)
        if not m:
            continue
        ins = [mm.group(1) for line in func.split("\n") if (mm := INSTR.match(line))]
        mma = [i for i, t in enumerate(ins) if opcode(t) == "IMMA"]
        if not mma:
            continue
        span = ins[mma[0]:mma[-1] + 1]
        mix = collections.Counter(opcode(t) for t in span)
        top = ", ".join(f"{k} {v / len(mma):.1f}" for k, v in mix.most_common(6))
        print(f"{TYPES.get(m.group(1), m.group(1)):8} {m.group(3):10} {m.group(4):>2} warps: "
              f"{len(span) / len(mma):5.1f} per mma ({len(mma)} IMMA; {top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
