"""`spark-setup models`: the catalog's variants, what is on disk, and the pins in force."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, ModelsDirOpt, PrefixOpt, StateDirOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        pins: Optional[Path] = typer.Option(None, "--pins", help="Also apply this pins file (as download would)."),
        models_dir: Optional[Path] = ModelsDirOpt,
        prefix: Optional[Path] = PrefixOpt,
        state_dir: Optional[Path] = StateDirOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """List the model variants, their state on disk and the pins (commit, SHA-256) in force."""
        from rich.console import Console
        from rich.table import Table

        from ..catalog import PinStore
        from ..download import human, local_status

        settings = settings_from(prefix=prefix, models_dir=models_dir, state_dir=state_dir)
        rows = local_status(settings, pins)
        store = PinStore(settings.state_dir, pins)
        if as_json:
            typer.echo(json.dumps({"models_dir": str(settings.models_dir), "variants": rows,
                                   "pins": [p.as_dict() for p in store.all()]}, indent=2))
            return
        table = Table(title=f"models in {settings.models_dir}")
        for col in ("variant", "size", "memory", "for", "draft", "on disk", "pin (commit / sha256)"):
            table.add_column(col)
        for r in rows:
            pin = r["pin"]
            pin_s = f"{pin['commit'][:10]} / {(pin['sha256'] or pin['git_oid'] or '')[:10]}" if pin else "not pinned yet"
            name = r["name"] + (" *" if r["current"] else "")
            draft = ", ".join(r["drafts"]) or (f"for {', '.join(r['pairs_with'])}" if r["pairs_with"] else "")
            size = human(pin["size"]) if pin else f"~{human(r['approx_bytes'])}"
            table.add_row(name, size, f"~{r['memory_gib']:.0f} GiB", r["machine"], draft, r["state"], pin_s)
        console = Console()
        console.print(table)
        console.print("* = models/current.gguf.  Pins are taken from the hub on first download "
                      f"(state: {store.path}); --pins FILE supplies known-good ones.", highlight=False)
        others = [p for p in store.all() if p.key not in {f"{r['repo']}/{r['file']}" for r in rows}]
        for p in others:
            console.print(f"pin: {p.repo}/{p.file} @ {p.commit[:12]} sha256 {(p.sha256 or p.git_oid or '')[:12]}… "
                          f"({human(p.size)}, from {p.source})", highlight=False)
