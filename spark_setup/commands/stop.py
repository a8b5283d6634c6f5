"""`spark-setup stop`: stop the server (systemd unit or the detached demo server)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import service
from . import _service_ui as ui
from .common import PrefixOpt, StateDirOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("stop")
    def stop(prefix: Optional[Path] = PrefixOpt, state_dir: Optional[Path] = StateDirOpt) -> None:
        """Stop the server. The unit stays enabled (it starts again at boot); `uninstall` removes it."""
        settings = settings_from(prefix, None, state_dir)
        done = service.stop(settings)
        if not done:
            ui.console.print("nothing to stop: no server of this install is running")
            return
        for what in done:
            ui.console.print(f"stopped {what}")
