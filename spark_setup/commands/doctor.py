"""`spark-setup doctor`: probe this host, check it against a target, print a table (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..doctor import Report, run_checks
from ..errors import UsageError
from ..host import HostFacts, probe
from .common import HostOpt, JsonOpt, ModelsDirOpt, PortOpt, PrefixOpt, StateDirOpt, TargetOpt, settings_from

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def model_bytes_for(variant: Optional[str], with_mtp: bool) -> Optional[int]:
    """Size of the files a download of `variant` needs (None = doctor's defaults)."""
    if variant is None and not with_mtp:
        return None
    from .. import catalog

    name = variant or catalog.DEFAULT_VARIANT
    catalog.get_variant(name)  # UsageError for an unknown name
    return sum(v.approx_bytes for v in catalog.files_for(name, with_mtp))


def load_facts(path: Path) -> HostFacts:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("host"), dict) and "checks" in data:
            data = data["host"]  # a whole `doctor --json` report
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return HostFacts.from_dict(data)
    except OSError as exc:
        raise UsageError(f"cannot read facts file {path}: {exc.strerror}", "pass a file written by `doctor --json`")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"facts file {path} is not host facts: {exc}",
                         "pass a file written by `doctor --json` (its \"host\" object) or by HostFacts.to_json()")


def render(report: Report, console: Console) -> None:
    f = report.facts
    title = f"spark-setup doctor (target: {report.target})"
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("measured")
    table.add_column("required")
    for c in report.checks:
        table.add_row(c.id, f"[{STYLE[c.status]}]{c.status.upper()}[/]", c.measured, c.required)
    console.print(table)
    for c in report.checks:
        if c.status != "pass" and c.fix:
            console.print(f"[{STYLE[c.status]}]{c.status}[/] [bold]{c.id}[/]: {c.fix}")
    n_fail, n_warn = len(report.failed), len(report.warnings)
    if report.ok:
        extra = f" ({n_warn} warning{'s' if n_warn != 1 else ''})" if n_warn else ""
        console.print(f"[green]ready[/] for target {report.target}{extra}")
    else:
        ids = ", ".join(c.id for c in report.failed)
        console.print(f"[bold red]not ready[/] for target {report.target}: {n_fail} check"
                      f"{'s' if n_fail != 1 else ''} failed ({ids})")
    if f is not None and f.errors:
        console.print("probe notes: " + "; ".join(f.errors.values()), style="dim")


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        target: Optional[str] = TargetOpt,
        as_json: bool = JsonOpt,
        prefix: Optional[Path] = PrefixOpt,
        models_dir: Optional[Path] = ModelsDirOpt,
        state_dir: Optional[Path] = StateDirOpt,
        port: Optional[int] = PortOpt,
        host: Optional[str] = HostOpt,
        variant: Optional[str] = typer.Option(None, "--variant",
                                              help="Size the disk/memory checks for this model variant."),
        with_mtp: bool = typer.Option(False, "--with-mtp", help="Count the MTP draft too."),
        facts_file: Optional[Path] = typer.Option(None, "--facts", metavar="FILE",
                                                  help="Check saved host facts (JSON) instead of probing this host."),
    ) -> None:
        """Check this host: architecture, GPU, CUDA driver and toolkit, memory, disk, build tools, port.

        Exit 0 when nothing fails, 1 when a check fails, 2 on usage errors.
        """
        s = settings_from(prefix, models_dir, state_dir, port, host, target)
        model_bytes = model_bytes_for(variant, with_mtp)
        if facts_file is not None:
            facts = load_facts(facts_file)
        else:
            facts = probe(s)
        report = run_checks(facts, s.target, model_bytes=model_bytes, already_downloaded=facts.models_dir_bytes)
        if as_json:
            typer.echo(report.to_json())
        else:
            render(report, Console(highlight=False))
        if not report.ok:
            raise typer.Exit(1)
