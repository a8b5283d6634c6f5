"""`spark-setup build`: compile the bundled engine for this machine (cached by source + toolchain key)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .common import JsonOpt, PrefixOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build(arch: str = typer.Option("auto", "--arch", help="auto (detect the GPU), cpu, sm_121 (GB10), sm_90 (H100/H200)."),
              jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (default: all cores)."),
              force: bool = typer.Option(False, "--force", help="Rebuild from a clean tree even if up to date."),
              prefix: Optional[Path] = PrefixOpt, as_json: bool = JsonOpt) -> None:
        """Build libds4engine.so into <prefix>/engine/<key>/ (reused when sources and toolchain are unchanged)."""
        from ..engine.build import build_engine

        settings = settings_from(prefix=prefix)
        t0 = time.monotonic()
        res = build_engine(settings, arch=arch, jobs=jobs, force=force, progress=not as_json)
        if as_json:
            typer.echo(json.dumps({"key": res.key, "arch": res.arch, "up_to_date": res.up_to_date,
                                   "lib_path": str(res.lib_path), "build_dir": str(res.build_dir),
                                   "note": res.note, "manifest": res.manifest}, indent=2))
            return
        out = Console(highlight=False, soft_wrap=True)
        if res.note:
            out.print(f"note: {res.note}")
        if res.up_to_date:
            out.print(f"engine up to date ({res.arch}, key {res.key}): {res.lib_path}")
        else:
            out.print(f"engine built ({res.arch}, key {res.key}) in {time.monotonic() - t0:.1f} s: {res.lib_path}")
