"""`spark-setup uninstall [--purge] [--yes]`: remove the server, units, user, venv and engine builds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..install import plan_uninstall, uninstall
from . import _service_ui as ui
from .common import ModelsDirOpt, PrefixOpt, StateDirOpt, YesOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("uninstall")
    def uninstall_cmd(purge: bool = typer.Option(False, "--purge", help="Also delete the model files and pins."),
                      yes: bool = YesOpt, prefix: Optional[Path] = PrefixOpt,
                      models_dir: Optional[Path] = ModelsDirOpt, state_dir: Optional[Path] = StateDirOpt) -> None:
        """Stop and remove the server (units, service user), the venv, engine builds and state.
        Model files stay unless --purge."""
        settings = settings_from(prefix, models_dir, state_dir)
        plan = plan_uninstall(settings, purge)
        out = ui.console
        out.print(f"uninstalling spark-setup from {settings.prefix}" + (" (purge: models too)" if purge else ""))
        for p in plan.remove + plan.links:
            out.print(f"  remove {p}")
        for p, why in plan.keep:
            out.print(f"  keep   {p}: {why}")
        if not ui.confirm("remove these, and stop and remove the server?", yes):
            raise typer.Exit(1)
        removed, kept, notes = uninstall(settings, plan)
        # The venv running this may be gone now: only builtins from here on.
        print("removed:" if removed else "removed: nothing")
        for x in removed:
            print(f"  {x}")
        if kept:
            print("kept:")
            for x in kept:
                print(f"  {x}")
        for n in notes:
            print(f"note: {n}")
        if settings.prefix.exists():
            left = sorted(p.name for p in settings.prefix.iterdir())
            if left:
                print(f"note: {settings.prefix} still holds: {', '.join(left)}")
