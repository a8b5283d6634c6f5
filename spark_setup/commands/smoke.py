"""`spark-setup smoke`: ask the capital of France, require Paris."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UsageError
from .common import JsonOpt, ModelsDirOpt, PrefixOpt, StateDirOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("smoke")
    def smoke_cmd(
        url: Optional[str] = typer.Option(None, "--url", help="Ask this OpenAI-compatible server "
                                          "(default: the installed server)."),
        model: Optional[Path] = typer.Option(None, "--model", help="Start a throwaway server on this GGUF and ask it."),
        demo: bool = typer.Option(False, "--demo", help="Start a throwaway server on the bundled demo model."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SPARK_SETUP_API_KEY",
                                              help="Bearer key of the server at --url."),
        ctx: int = typer.Option(4096, "--ctx", help="Context of the throwaway server."),
        backend: str = typer.Option("auto", "--backend", help="Engine backend of the throwaway server: auto, cpu "
                                    "or cuda."),
        prefix: Optional[Path] = PrefixOpt, models_dir: Optional[Path] = ModelsDirOpt,
        state_dir: Optional[Path] = StateDirOpt, as_json: bool = JsonOpt,
    ) -> None:
        """Ask "What is the capital of France? Answer in one word." and pass when the answer says Paris."""
        from ..smoke import QUESTION, run_smoke

        if sum(bool(x) for x in (url, model, demo)) > 1:
            raise UsageError("--url, --model and --demo are exclusive", "pass one of them")
        if model is not None and not Path(model).expanduser().is_file():
            raise UsageError(f"model file {model} does not exist", "pass an existing GGUF file")
        settings = settings_from(prefix, models_dir, state_dir)
        console = Console(stderr=True, highlight=False)
        status = console.status("starting a server and loading the model" if (model or demo) else "asking")
        with status:
            res = run_smoke(url=url, model=model, demo=demo, settings=settings, api_key=api_key, ctx=ctx, backend=backend,
                            progress=lambda b: status.update(f"loading: {b.get('progress', '')}"))
        if as_json:
            typer.echo(res.to_json())
        else:
            out = Console(highlight=False)
            out.print(f"question: {QUESTION}")
            out.print(f"answer:   {res.answer!r}")
            ttft = f"{res.ttft_s * 1000:.0f} ms" if res.ttft_s is not None else "n/a"
            tps = f"{res.tokens_per_s:.1f}" if res.tokens_per_s else "n/a"
            out.print(f"time to first token: {ttft}   tokens/s: {tps}   model: {res.model}")
            out.print("[bold green]PASS[/]: the answer says Paris" if res.passed else
                      "[bold red]FAIL[/]: the answer does not say Paris")
        if not res.passed:
            raise typer.Exit(1)
