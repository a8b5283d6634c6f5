"""`spark-setup install`: doctor -> download -> build -> smoke -> (with --start or --demo) serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..install import Hooks, InstallOptions, Step, run_install
from . import _service_ui as ui
from .common import HostOpt, ModelsDirOpt, PortOpt, PrefixOpt, StateDirOpt, TargetOpt, YesOpt, settings_from

MARK = {"done": "[green]✓ done[/]", "skipped": "[cyan]↷ skipped[/]", "failed": "[bold red]✗ failed[/]",
        "not run": "[dim]- not run[/]"}


def register(app: typer.Typer) -> None:
    @app.command("install")
    def install(
        variant: Optional[str] = typer.Option(None, "--variant", help="Model variant (see `spark-setup models`)."),
        with_mtp: bool = typer.Option(False, "--with-mtp", help="Also download the MTP draft model."),
        start: bool = typer.Option(False, "--start", help="Start the server when done (systemd unit)."),
        demo: bool = typer.Option(False, "--demo", help="CPU demo: bundled demo model, CPU engine, and serve it."),
        yes: bool = YesOpt,
        system: bool = typer.Option(False, "--system", help="Install the server as a system unit (default as root)."),
        user: bool = typer.Option(False, "--user", help="Install the server as a user unit (default without sudo)."),
        arch: str = typer.Option("auto", "--arch", help="Engine arch: auto, cpu, sm_121, sm_90, ..."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (default: all cores)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision to download (default: pinned)."),
        token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN)."),
        connections: int = typer.Option(8, "--connections", help="Parallel download connections."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network; use what is on disk."),
        prefix: Optional[Path] = PrefixOpt, models_dir: Optional[Path] = ModelsDirOpt,
        state_dir: Optional[Path] = StateDirOpt, port: Optional[int] = PortOpt, host: Optional[str] = HostOpt,
        target: Optional[str] = TargetOpt,
    ) -> None:
        """Set everything up: doctor, download, build, smoke, and with --start (or --demo) the server.

        Every step is skipped when already complete, so re-running is cheap and safe."""
        from ..errors import UsageError

        if system and user:
            raise UsageError("--system and --user contradict each other", "give one of them")
        settings = settings_from(prefix, models_dir, state_dir, port, host, target)
        opts = InstallOptions(variant=variant, with_mtp=with_mtp, start=start, demo=demo, yes=yes, target=target,
                              arch=arch, revision=revision, token=token, connections=connections, offline=offline,
                              scope="system" if system else ("user" if user else None), jobs=jobs)
        if demo and variant:
            raise UsageError("--demo and --variant contradict each other", "--demo uses the bundled demo model")
        if demo and with_mtp:
            raise UsageError("--demo has no MTP draft", "drop --with-mtp")
        out = ui.console
        bar = ui.ReadinessBar("server")

        def started(name: str, what: str) -> None:
            out.print(f"[bold]==> {name}[/]: {what}")

        def finished(step: Step) -> None:
            bar.close()
            out.print(f"    {MARK[step.status]} {step.name} ({step.seconds:.2f} s): {step.detail}")
            if step.hint and step.status == "failed":
                out.print(f"    [bold]fix:[/] {step.hint}")

        hooks = Hooks(step_started=started, step_finished=finished,
                      confirm=lambda q: ui.confirm(q, yes), progress=True, readiness=bar)
        res = run_install(settings, opts, hooks)
        bar.close()
        for n in res.notes:
            out.print(f"note: {n}")
        out.print(f"receipt: {res.receipt}")
        if res.failed is not None:
            raise typer.Exit(1)
        if res.url:
            how = {"foreground": f"detached demo server (log: {settings.log_dir / 'server.log'}; "
                                 "`spark-setup stop` ends it)"}.get(res.serving or "", f"{res.serving} unit")
            out.print(f"serving via the {how}")
            ui.print_ready(res.url)
        else:
            out.print("installed; start the server with: spark-setup serve --enable (or re-run install with --start)")
