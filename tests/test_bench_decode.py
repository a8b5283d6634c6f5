"""tools/bench_decode.py (the H200 decode/prefill benchmark): its arguments are checked before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_decode.py"


def test_bad_compare_and_contexts_are_one_line_usage_errors():
    for args, needle in ((["--compare", "256:x"], "is not BATCH:GEMM[:MM6]"),
                         (["--compare", "256:1:1:0"], "is not BATCH:GEMM[:MM6]"),
                         (["--contexts", "2k"], "comma-separated list")):
        r = subprocess.run([sys.executable, str(TOOL), "missing.gguf"] + args, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, args
