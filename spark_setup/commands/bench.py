"""`spark-setup bench`: llama-benchy-comparable numbers from any OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

from ..errors import UsageError
from .common import HostOpt, PortOpt, PrefixOpt, settings_from


class MultiValueCommand(TyperCommand):
    """Lets list options take several values after one flag, as llama-benchy's do (`--tg 32 128 512`).

    Click options take one value per flag; this rewrites `--tg 32 128` into `--tg 32 --tg 128` before parsing,
    for the options named in `multi_value_flags`.
    """

    multi_value_flags: frozenset[str] = frozenset()

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out: list[str] = []
        current: Optional[str] = None
        for a in args:
            if a.startswith("-") and not _is_number(a):
                name = a.split("=", 1)[0]
                current = name if name in self.multi_value_flags else None
                out.append(a)
                continue
            if current is not None and out and out[-1] != current:
                out.append(current)
            out.append(a)
        return super().parse_args(ctx, out)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class BenchCommand(MultiValueCommand):
    multi_value_flags = frozenset({"--pp", "--tg", "--depth", "--concurrency"})


def register(app: typer.Typer) -> None:
    @app.command("bench", cls=BenchCommand)
    def bench_cmd(
        url: Optional[str] = typer.Option(None, "--url", help="Server base URL (default http://HOST:PORT of the "
                                          "settings, i.e. the local spark-setup server)."),
        model: Optional[str] = typer.Option(None, "--model", help="Model name to request (default: the first "
                                            "of GET /v1/models)."),
        pp: List[int] = typer.Option([2048], "--pp", help="Prompt tokens (user message); several allowed."),
        tg: List[int] = typer.Option([32], "--tg", help="Tokens to generate; several allowed."),
        depth: List[int] = typer.Option([0], "--depth", help="Context tokens before the prompt (system "
                                        "message); several allowed."),
        runs: int = typer.Option(3, "--runs", help="Runs per test (mean ± std over them)."),
        concurrency: List[int] = typer.Option([1], "--concurrency", help="Concurrent requests; several allowed."),
        latency_mode: str = typer.Option("generation", "--latency-mode",
                                         help="Latency subtracted from ttfr: generation, api or none."),
        fmt: str = typer.Option("md", "--format", help="Output: md, json or csv."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="GGUF whose tokenizer counts the "
                                                 "prompt (default: the DeepSeek-V4 tokenizer)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SPARK_SETUP_API_KEY",
                                              help="Bearer token for the server."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the book offsets (default random)."),
        no_warmup: bool = typer.Option(False, "--no-warmup", help="Skip the warm-up requests."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the report to this file."),
        host: Optional[str] = HostOpt, port: Optional[int] = PortOpt, prefix: Optional[Path] = PrefixOpt,
    ) -> None:
        """Benchmark prompt processing and generation like llama-benchy (same tests, columns and metrics)."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .. import bench as b

        if fmt not in b.FORMATS:
            raise UsageError(f"--format must be one of {', '.join(b.FORMATS)}, got {fmt!r}")
        s = settings_from(prefix=prefix, port=port, host=host)
        if url is None:
            url = f"http://{s.host}:{s.port}"
        cfg = b.BenchConfig(url=url, model=model, models_dir=s.models_dir, pp=pp, tg=tg, depth=depth, runs=runs, concurrency=concurrency,
                            latency_mode=latency_mode, api_key=api_key, tokenizer=tokenizer, seed=seed,
                            warmup=not no_warmup)
        b.validate(cfg)
        err = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("warming up", total=None)

            def progress(desc: str, done: int, total: int) -> None:
                bar.update(task, description=desc, completed=done, total=total)

            rep = b.run_bench(cfg, progress)
        text = {"md": b.to_markdown, "json": b.to_json, "csv": b.to_csv}[fmt](rep)
        typer.echo(text, nl=not text.endswith("\n"))
        if output is not None:
            output.write_text(text, encoding="utf-8")
