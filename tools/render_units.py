#!/usr/bin/env python3
"""Regenerate systemd/ (the units as rendered with default settings, committed and checked by the tests).

Usage: .venv/bin/python tools/render_units.py [--check]
--check: exit 1 and print a diff when systemd/ differs from a fresh rendering (what tests/test_service_units.py does).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spark_setup.service import render_canonical  # noqa: E402


def main(argv: list[str]) -> int:
    check = "--check" in argv
    out = ROOT / "systemd"
    stale = 0
    for rel, text in render_canonical().items():
        path = out / rel
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if old == text:
            continue
        stale += 1
        if check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       f"systemd/{rel} (committed)", f"systemd/{rel} (rendered)"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote systemd/{rel}")
    if check and stale:
        print(f"{stale} file(s) in systemd/ differ from a fresh rendering: run tools/render_units.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
