"""`spark-setup inspect FILE.gguf`: metadata, tensor table, DS4 layout check and decode bytes per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from .common import JsonOpt

GIB = 1024**3
MAX_MISMATCH_ROWS = 40


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict) and "len" in v:
        return f"<array of {v['len']:,} {v.get('array', '')}>"
    if isinstance(v, list):
        s = ",".join(str(x) for x in v)
        return f"[{s[:70]}{'...' if len(s) > 70 else ''}] (len {len(v)})"
    if isinstance(v, float):
        return f"{v:g}"
    s = str(v)
    return s if len(s) <= 90 else s[:87] + "..."


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        file: Path = typer.Argument(..., help="A .gguf file (only its header and tensor table are read)."),
        as_json: bool = JsonOpt,
        ctx: int = typer.Option(16384, "--ctx", help="Context length for the decode bytes-per-token estimate."),
        strict: bool = typer.Option(False, "--strict", help="Exit 1 when the file differs from the DS4 layout."),
        all_metadata: bool = typer.Option(False, "--all-metadata", help="Show every metadata key."),
    ) -> None:
        """Show a GGUF's metadata, its tensors grouped by layer pattern, its differences from the DS4 layout and
        the bytes a decode step reads at context --ctx."""
        from ..engine.gguf_info import read_info

        if ctx < 0:
            raise UsageError(f"--ctx must be >= 0, got {ctx}")
        info = read_info(file)
        if as_json:
            typer.echo(json.dumps(info.to_dict(ctx), indent=2, default=str))
        else:
            _render(info, ctx, all_metadata)
        if strict and not info.valid:
            raise typer.Exit(1)


def _render(info: Any, ctx: int, all_metadata: bool) -> None:
    con = Console()
    kind = {"main": f"DS4 main model ({info.variant})", "mtp": "DS4 MTP draft", "other": "not a DS4 file"}[info.kind]
    con.print(f"[bold]{info.path}[/]  {info.file_size:,} B ({info.file_size / GIB:.2f} GiB)  GGUF v{info.version}, "
              f"{info.n_kv} keys, {len(info.tensors)} tensors, alignment {info.alignment}, "
              f"data at {info.data_offset:,}  [bold]{kind}[/]")

    meta = Table(title="metadata", show_edge=False)
    meta.add_column("key", no_wrap=True)
    meta.add_column("value")
    for k, v in info.metadata.items():
        if all_metadata or k.startswith("general.") or k.startswith(info.arch + ".") or k in (
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens"):
            meta.add_row(k, _fmt_value(v))
    con.print(meta)

    t = Table(title="tensors (per-layer patterns folded)", show_edge=False)
    for col, just in (("tensor", "left"), ("count", "right"), ("layers", "left"), ("dims", "left"),
                      ("type", "left"), ("bytes", "right")):
        t.add_column(col, justify=just, no_wrap=col in ("tensor", "bytes"))  # type: ignore[arg-type]
    for g in info.groups():
        t.add_row(g.pattern, str(g.count), g.layers, " ".join(g.dims), " ".join(g.types), f"{g.nbytes:,}")
    t.add_row("[bold]total[/]", str(len(info.tensors)), "", "", "",
              f"[bold]{info.tensor_bytes:,}[/] ({info.tensor_bytes / GIB:.2f} GiB)")
    con.print(t)

    if info.valid:
        con.print(f"[green]layout: matches the DS4 {info.kind} layout[/]")
    else:
        kinds = {"missing": 0, "unexpected": 0, "dims": 0, "type": 0, "metadata": 0}
        for m in info.mismatches:
            if m.found == "missing":
                kinds["missing"] += 1
            elif m.expected == "absent":
                kinds["unexpected"] += 1
            elif m.found.startswith("dims "):
                kinds["dims"] += 1
            elif m.found.startswith("type "):
                kinds["type"] += 1
            else:
                kinds["metadata"] += 1
        summary = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        mt = Table(title=f"layout: {len(info.mismatches)} difference(s) from the DS4 {info.kind} layout ({summary})",
                   show_edge=False, title_style="bold red")
        mt.add_column("name", no_wrap=True)
        mt.add_column("expected")
        mt.add_column("found")
        for m in info.mismatches[:MAX_MISMATCH_ROWS]:
            mt.add_row(m.name, m.expected, m.found)
        con.print(mt)
        if len(info.mismatches) > MAX_MISMATCH_ROWS:
            con.print(f"... and {len(info.mismatches) - MAX_MISMATCH_ROWS} more (--json lists all)")

    if info.kind == "main":
        b = info.bytes_per_token(ctx)
        bt = Table(title=f"decode bytes per token at ctx {ctx:,} (f32 KV)", show_edge=False)
        bt.add_column("component")
        bt.add_column("bytes", justify="right")
        bt.add_column("GiB", justify="right")
        for name, v in (("layer weights (always on)", b.layers), ("head + embedding row", b.head),
                        (f"routed experts ({info.n_expert_used}/layer)", b.routed), ("KV cache reads", b.kv),
                        ("total", b.total)):
            bt.add_row(name, f"{v:,}", f"{v / GIB:.3f}")
        con.print(bt)
        if not b.indexer_active:
            con.print("(indexer query projections idle: every compressed row fits in top-k at this context)")
