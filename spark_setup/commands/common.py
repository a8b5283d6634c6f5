"""Options shared by several commands, and the one way commands turn flags into Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..settings import Settings, load_settings

PrefixOpt = typer.Option(None, "--prefix", help="Install prefix (default ~/.local/share/spark-setup).")
ModelsDirOpt = typer.Option(None, "--models-dir", help="Where model files live (default <prefix>/models).")
StateDirOpt = typer.Option(None, "--state-dir", help="Where state, pins and logs live (default <prefix>/state).")
PortOpt = typer.Option(None, "--port", help="Server port (default 8000).")
HostOpt = typer.Option(None, "--host", help="Server address (default 127.0.0.1).")
TargetOpt = typer.Option(None, "--target", help="Host target: spark, generic or cpu (default spark).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
YesOpt = typer.Option(False, "--yes", "-y", help="Assume yes; never prompt.")


def settings_from(prefix: Optional[Path] = None, models_dir: Optional[Path] = None,
                  state_dir: Optional[Path] = None, port: Optional[int] = None,
                  host: Optional[str] = None, target: Optional[str] = None) -> Settings:
    return load_settings({"prefix": prefix, "models_dir": models_dir, "state_dir": state_dir,
                          "port": port, "host": host, "target": target})
