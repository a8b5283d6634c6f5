"""`spark-setup logs [-f]`: the server's log (journal of the unit, or the detached server's log file)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .. import service
from ..errors import UserError
from .common import PrefixOpt, StateDirOpt, settings_from


def _follow_file(path: Path, lines: int, follow: bool) -> None:
    with open(path, "rb") as f:
        data = f.read()
        tail = data.splitlines(keepends=True)[-lines:] if lines > 0 else []
        sys.stdout.write(b"".join(tail).decode("utf-8", "replace"))
        sys.stdout.flush()
        while follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.3)


def register(app: typer.Typer) -> None:
    @app.command("logs")
    def logs(follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
             lines: int = typer.Option(100, "--lines", "-n", help="How many recent lines to show."),
             prefix: Optional[Path] = PrefixOpt, state_dir: Optional[Path] = StateDirOpt) -> None:
        """Show the server's log: `journalctl` for the unit, the log file for the detached demo server."""
        settings = settings_from(prefix, None, state_dir)
        st = service.service_state(settings)
        if st.mode in ("system", "user"):
            argv = service.Systemctl(st.mode, sudo=False).journal_cmd(follow=follow, lines=lines)  # type: ignore[arg-type]
            sys.stdout.flush()
            try:
                os.execvp(argv[0], argv)
            except OSError as exc:
                raise UserError(f"cannot run {argv[0]}: {exc.strerror}", "install systemd's journalctl")
        log = Path(st.log) if st.log else service.log_file(settings)
        if not log.exists():
            raise UserError("no server log found: no unit is installed and no foreground server has run here",
                            "start the server: spark-setup serve --enable (or serve --foreground)")
        try:
            _follow_file(log, lines, follow)
        except KeyboardInterrupt:
            pass
