"""`spark-setup roofline`: measured bandwidth, bytes per token and the decode roofline per context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .bench import MultiValueCommand
from .common import JsonOpt

GIB = 1024**3


class RooflineCommand(MultiValueCommand):
    multi_value_flags = frozenset({"--ctx"})


def register(app: typer.Typer) -> None:
    @app.command("roofline", cls=RooflineCommand)
    def roofline_cmd(
        model: Optional[Path] = typer.Option(None, "--model", help="Main GGUF to read bytes/token from "
                                             "(default: the DS4 reference layout of the facts)."),
        ctx: List[int] = typer.Option([0, 4096, 16384], "--ctx", help="Context lengths; several allowed."),
        bench_url: Optional[str] = typer.Option(None, "--bench", help="Also measure decode t/s on this "
                                                "OpenAI-compatible server and compare."),
        plot_file: Optional[Path] = typer.Option(None, "--plot", help="Draw roofline vs measured to FILE.svg|png "
                                                 "(needs matplotlib: the `plot` extra)."),
        as_json: bool = JsonOpt,
        backend: str = typer.Option("auto", "--backend", help="Probe memory of: auto (GPU if any), cpu or cuda."),
        probe_gib: float = typer.Option(0.0, "--probe-gib", help="Probe buffer size in GiB (0 = engine default: "
                                        "8 GiB on the GPU, 1 GiB on the CPU)."),
        iters: int = typer.Option(0, "--iters", help="Probe runs (median taken; 0 = engine default)."),
        bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Skip the probe: use this read "
                                                  "bandwidth in GB/s."),
        variant: str = typer.Option("q2", "--variant", help="Reference layout without --model: q2 or q4."),
        tg: int = typer.Option(128, "--tg", help="With --bench: tokens generated per measurement."),
        runs: int = typer.Option(1, "--runs", help="With --bench: runs per context."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="With --bench: GGUF whose tokenizer "
                                                 "counts the prompt (default: --model, else DeepSeek-V4)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SPARK_SETUP_API_KEY"),
    ) -> None:
        """Decode roofline per context: read bandwidth (engine probe) / bytes read per token (from the GGUF)."""
        from .. import roofline as r
        from ..errors import UsageError

        if probe_gib < 0 or iters < 0:
            raise UsageError("--probe-gib and --iters must be >= 0")
        # what is cheap to check first: a missing or corrupt --model must not be reported as a probe problem
        r.build_roofline(ctx, r.Bandwidth("given", 0, 0, 1.0, None), model, variant)
        if bandwidth is not None:
            if bandwidth <= 0:
                raise UsageError(f"--bandwidth must be > 0 GB/s, got {bandwidth}")
            bw = r.Bandwidth("given", 0, 0, bandwidth, None)
        else:
            bw = r.probe_bandwidth(backend, int(probe_gib * GIB), iters)
        rl = r.build_roofline(ctx, bw, model, variant)
        if bench_url:
            tok = tokenizer if tokenizer is not None else model
            r.measure_decode(rl, bench_url, tg=tg, runs=runs, tokenizer=tok, api_key=api_key)
        if plot_file is not None:
            r.plot(rl, plot_file)
        if as_json:
            typer.echo(json.dumps(rl.to_dict(), indent=2))
            return
        _render(rl, plot_file)


def _render(rl, plot_file) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    bw = rl.bandwidth
    src = "given" if bw.backend == "given" else f"{bw.backend} probe"
    copy = f", copy {bw.copy_gbs:.1f} GB/s" if bw.copy_gbs else ""
    con.print(f"read bandwidth {bw.read_gbs:.1f} GB/s ({src}{copy}); model: {rl.model}")
    t = Table(title="decode roofline (one stream)", show_edge=False)
    for col in ("ctx", "bytes/token", "GiB/token", "roofline t/s"):
        t.add_column(col, justify="right")
    if rl.bench_url:
        t.add_column("measured t/s", justify="right")
        t.add_column("of roofline", justify="right")
    for p in rl.points:
        row = [f"{p.ctx:,}", f"{p.bytes_per_token:,}", f"{p.bytes_per_token / GIB:.3f}", f"{p.roofline_tps:.1f}"]
        if rl.bench_url:
            row += ["" if p.measured_tps is None else f"{p.measured_tps:.2f} ± {p.measured_std:.2f}",
                    "" if p.fraction is None else f"{100 * p.fraction:.1f}%"]
        t.add_row(*row)
    con.print(t)
    for n in rl.notes:
        con.print(f"note: {n}")
    if plot_file is not None:
        con.print(f"plot written to {plot_file}")
