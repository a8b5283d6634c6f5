"""Rendering shared by install, serve --enable, status and uninstall (this module prints; service.py does not).

`serve_enable(...)` is what `spark-setup serve --enable` calls (commands/serve.py belongs to the server; it only
forwards its flags here)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax

from .. import receipt as rc
from .. import service
from ..errors import UsageError, UserError
from ..settings import Settings

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class ReadinessBar:
    """A progress bar fed by service.Readiness observations: % from STATUS=/health, text = the server's status."""

    def __init__(self, what: str, out: Console | None = None):
        self.out = out or err
        self.what = what
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, obs: service.Readiness) -> None:
        if not self.out.is_terminal:  # logs and pipes get the step lines only, not a bar's leftovers
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.fields[pct]}"), TextColumn("{task.fields[status]}"),
                                     TimeElapsedColumn(), console=self.out, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=100, pct="", status="")
        state = obs.status_text or (f"health {obs.health_code}" if obs.health_code else obs.active_state)
        pct = obs.percent if obs.health_code != 200 else 100.0
        self.progress.update(self.task, completed=pct or 0, pct=f"{pct:.0f}%" if pct is not None else "",
                             status=f"{obs.active_state} · {state}"[:80])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def model_id(url: str) -> str:
    import httpx

    try:
        data = httpx.get(url + "/v1/models", timeout=3, trust_env=False).json()
        return str(data["data"][0]["id"])
    except Exception:  # the curl example still works with any name the server accepts
        return "deepseek-v4-flash"


def print_ready(url: str, out: Console | None = None) -> None:
    out = out or console
    mid = model_id(url)
    from ..smoke import QUESTION

    body = json.dumps({"model": mid, "messages": [{"role": "user", "content": QUESTION}]})
    out.print(f"[bold green]ready:[/] {url}  (OpenAI-compatible: {url}/v1; Anthropic-compatible: {url})")
    out.print("try it:")
    out.print(f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
              markup=False)


def resolve_model(settings: Settings, model: Optional[Path], demo: bool) -> tuple[Path, Optional[Path]]:
    """The model the unit serves: --model, --demo, the receipt's files, or <models>/current.gguf."""
    if model is not None and demo:
        raise UsageError("--model and --demo contradict each other", "give one of them")
    if model is not None:
        p = Path(model).expanduser()
        if not p.is_file():
            raise UserError(f"model file {p} does not exist", "give the path of a .gguf file, or run spark-setup download")
        return Path(os.path.abspath(p)), None
    if demo:
        from ..demo import demo_model_path

        return Path(demo_model_path()), None
    r = rc.load(settings)
    files = r.get("files") or []
    if files and Path(files[0]["path"]).is_file():
        mtp = Path(files[1]["path"]) if r.get("with_mtp") and len(files) > 1 else None
        return Path(files[0]["path"]), mtp
    cur = settings.models_dir / "current.gguf"
    if cur.exists():
        return Path(os.path.realpath(cur)), None
    raise UserError(f"no model found in {settings.models_dir}",
                    "download one first (spark-setup download), or pass --model FILE or --demo")


def resolve_engine(settings: Settings) -> Path:
    env = os.environ.get("DS4_ENGINE_LIB")
    if env and Path(env).is_file():
        return Path(os.path.abspath(env))
    lib = (rc.load(settings).get("engine") or {}).get("lib_path")
    if lib and Path(lib).is_file():
        return Path(lib)
    from ..engine.build import find_engine

    found = find_engine(settings)
    if found is None:
        raise UserError("the engine is not built for this install", "run: spark-setup build")
    return found


def serve_enable(settings: Settings, *, scope: Optional[str] = None, model: Optional[Path] = None,
                 demo: bool = False, dry_run: bool = False, yes: bool = False) -> int:
    """`spark-setup serve --enable [--user|--system] [--dry-run]`: render, diff, write, (re)start, follow, print."""
    if not dry_run and not service.systemd_booted():
        raise UserError("systemd is not running as PID 1 on this machine, so there is no service to enable",
                        "run the server in the foreground instead: spark-setup serve --foreground"
                        + (" --demo" if demo else ""))
    if scope is None:
        scope = service.default_scope()
    m, mtp = resolve_model(settings, model, demo)
    lib = resolve_engine(settings)
    plan = service.plan_enable(settings, scope=scope, model=m, mtp=mtp, engine_lib=lib,  # type: ignore[arg-type]
                               check_user=not dry_run)
    for path, diff in plan.diffs.items():
        if diff:
            console.print(Syntax(diff, "diff", theme="ansi_dark", background_color="default"))
        else:
            console.print(f"{path}: unchanged")
    if plan.user_note:
        console.print(f"note: {plan.user_note}")
    if dry_run:
        console.print(f"dry run: nothing written ({scope} scope; {len(plan.files)} files)")
        return 0
    bar = ReadinessBar(f"starting {service.UNIT_NAME}")
    try:
        res = service.enable(settings, plan, progress=bar)
    finally:
        bar.close()
    r = rc.load(settings)  # the receipt records what exists, whichever command put it there
    prev = r.get("service") or {}
    r["service"] = {"mode": scope, "units": [str(p) for p in plan.files], "user": plan.spec.user, "url": res.url,
                    "created_user": prev.get("created_user", False) or any("created the system user" in n
                                                                           for n in res.notes)}
    rc.save(settings, r)
    console.print(f"{'restarted' if res.restarted else 'started'} the {scope} unit {service.UNIT_NAME} "
                  f"({plan.spec.unit_path}); ready in {res.elapsed_s:.1f} s")
    for n in res.notes:
        console.print(f"note: {n}")
    print_ready(res.url)
    return 0


def confirm(question: str, yes: bool) -> bool:
    """Ask on the terminal; without one (curl | bash, CI) fail with the --yes hint instead of hanging."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError(f"{question} needs an answer, and there is no terminal to ask on", "re-run with --yes")
    return typer.confirm(question, default=False)
