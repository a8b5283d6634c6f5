#!/usr/bin/env python3
"""Prefill A/B on one GPU: the same prompt prefilled in fresh sessions under several environment settings, the
settings alternating round by round (so that clock and thermal drift hit all of them alike); prints t/s per round
and the last logits' largest difference from the first setting's, relative to their largest magnitude.

    python3 tools/prefill_ab.py MODEL.gguf --lib build/gpu-sm_90/libds4engine.so \\
        --config base: --config rb1:DS4_MM6_RB=1 --config f32gemm:DS4_CUDA_MM6=0 --rounds 2 [--no-roundtrip]

A setting is NAME:VAR=VALUE,VAR=VALUE (empty after the colon: the defaults). The engine reads its variables when
a session is created (and cuda_mm6's DS4_MM6_RB at every capture), so each round creates fresh sessions. With
--no-roundtrip the sessions run f32 throughout, where two correct prefill paths agree to rounding; with the
official FP8/FP4 round-trips on, random weights amplify any rounding difference (bench/h200_decode.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_config(text: str) -> tuple[str, dict]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:VAR=VALUE,... (NAME: for the defaults)")
    env = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: expected VAR=VALUE")
        env[k] = v
    return name, env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--lib", default=os.environ.get("DS4_ENGINE_LIB"))
    ap.add_argument("--config", type=parse_config, action="append", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-roundtrip", action="store_true")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda", help="cpu: to try the script on a tiny model")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.rounds < 1:
        ap.error("--tokens and --rounds must be >= 1")
    if a.lib:
        os.environ["DS4_ENGINE_LIB"] = str(a.lib)
    from spark_setup.engine.runtime import Model
    from spark_setup.errors import UserError

    try:
        model = Model(a.model, backend=a.backend)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lo = min(1000, model.n_vocab // 4)  # ordinary tokens, away from the special ones at either end
    toks = np.random.default_rng(1234).integers(lo, model.n_vocab - lo, size=a.tokens).astype(np.int32)
    base = {k: os.environ.get(k) for _, env in a.config for k in env}
    ref = None
    for rnd in range(a.rounds):
        for name, env in a.config:
            for k, v in base.items():  # every variable back to what it was, then this setting's
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            os.environ.update(env)
            with model.new_session(a.tokens + 8, roundtrip=not a.no_roundtrip) as s:
                t = time.monotonic()
                lg = s.eval(toks)
                dt = time.monotonic() - t
            ref = lg if ref is None else ref
            rel = float(np.abs(lg - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            print(f"round {rnd} {name:>12}: {a.tokens / dt:8.1f} t/s  argmax {int(np.argmax(lg))}  "
                  f"finite {bool(np.isfinite(lg).all())}  rel diff vs first {rel:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
