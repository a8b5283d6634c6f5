"""`spark-setup config show`: the effective settings and where each came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import HostOpt, JsonOpt, ModelsDirOpt, PortOpt, PrefixOpt, StateDirOpt, TargetOpt, settings_from


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Show the effective settings.", no_args_is_help=True)

    @config_app.command("show")
    def show(prefix: Optional[Path] = PrefixOpt, models_dir: Optional[Path] = ModelsDirOpt,
             state_dir: Optional[Path] = StateDirOpt, port: Optional[int] = PortOpt,
             host: Optional[str] = HostOpt, target: Optional[str] = TargetOpt,
             as_json: bool = JsonOpt) -> None:
        """Print each setting's effective value and its source (flag > env > config file > default)."""
        s = settings_from(prefix, models_dir, state_dir, port, host, target)
        values = s.as_dict()
        if as_json:
            typer.echo(json.dumps({"config_file": str(s.config_file),
                                   "settings": {k: {"value": v, "source": s.sources[k]} for k, v in values.items()}},
                                  indent=2))
            return
        table = Table(title=f"spark-setup settings (config file: {s.config_file})")
        table.add_column("setting")
        table.add_column("value")
        table.add_column("source")
        for k, v in values.items():
            table.add_row(k, str(v), s.sources[k])
        Console().print(table)

    app.add_typer(config_app, name="config")
