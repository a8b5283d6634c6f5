"""`spark-setup status`: what serves, is it healthy, which model, revision and engine, uptime, last tokens/s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .. import receipt as rc
from .. import service
from . import _service_ui as ui
from .common import HostOpt, JsonOpt, PortOpt, PrefixOpt, StateDirOpt, settings_from


def _tokens_per_s(body: dict[str, Any]) -> float | None:
    """The server's last generation speed, under the names a health body may use."""
    for holder in (body, body.get("last") or {}, body.get("stats") or {}, body.get("metrics") or {}):
        if not isinstance(holder, dict):
            continue
        for key in ("last_tokens_per_s", "tokens_per_s", "last_decode_tokens_per_s", "decode_tokens_per_s"):
            v = holder.get(key)
            if isinstance(v, (int, float)):
                return float(v)
    return None


def collect(settings) -> dict[str, Any]:
    st = service.service_state(settings)
    url = service.running_url(settings, st)
    code, body = service.health(url)
    r = rc.load(settings)
    files = r.get("files") or []
    engine = r.get("engine") or {}
    smoke = r.get("smoke") or {}
    tps = _tokens_per_s(body)
    return {
        "mode": st.mode,
        "unit": {"name": service.UNIT_NAME, "path": st.unit_path, "active_state": st.active_state,
                 "sub_state": st.sub_state, "enabled": st.unit_file_state, "status_text": st.status_text,
                 "restarts": st.n_restarts} if st.mode in ("system", "user") else None,
        "pid": st.main_pid,
        "url": url,
        "healthy": code == 200,
        "health_code": code,
        "health": body,
        "model": body.get("model") or (files[0]["path"] if files else None),
        "variant": r.get("variant"),
        "revision": r.get("revision"),
        "commit": r.get("commit"),
        "engine_key": engine.get("key"),
        "engine_arch": engine.get("arch"),
        "uptime_s": round(st.uptime_s, 1) if st.uptime_s is not None else None,
        "last_tokens_per_s": tps,
        "smoke_tokens_per_s": smoke.get("tokens_per_s"),
        "log": st.log,
        "receipt": str(rc.receipt_path(settings)) if r else None,
    }


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if h or d else "") + f"{m}m {s}s"


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status(as_json: bool = JsonOpt, prefix: Optional[Path] = PrefixOpt, state_dir: Optional[Path] = StateDirOpt,
               port: Optional[int] = PortOpt, host: Optional[str] = HostOpt) -> None:
        """Show whether the server runs (unit or detached), its health, model, revision, engine, uptime, speed."""
        settings = settings_from(prefix, None, state_dir, port, host)
        data = collect(settings)
        if as_json:
            typer.echo(json.dumps(data, indent=2, default=str))
            return
        t = Table(show_header=False, box=None, pad_edge=False)
        t.add_column(style="bold")
        t.add_column()
        mode = {"none": "not running", "foreground": "detached server (no systemd)"}.get(data["mode"],
                                                                                        f"{data['mode']} unit")
        t.add_row("server", mode)
        u = data["unit"]
        if u:
            state = f"{u['active_state']} ({u['sub_state']}), {u['enabled'] or 'not enabled'}"
            t.add_row("unit", f"{u['name']}: {state}" + (f", {u['restarts']} restart(s)" if u["restarts"] else ""))
            if u["status_text"]:
                t.add_row("status", u["status_text"])
        if data["pid"]:
            t.add_row("pid", str(data["pid"]))
        health = "200 ready" if data["healthy"] else (f"{data['health_code']}" if data["health_code"] else "no answer")
        t.add_row("health", f"{data['url']}/health: {health}")
        t.add_row("model", str(data["model"] or "-") + (f" ({data['variant']})" if data["variant"] else ""))
        t.add_row("revision", f"{data['revision']} ({data['commit']})" if data["commit"] else str(data["revision"] or "-"))
        t.add_row("engine", f"{data['engine_key']} ({data['engine_arch']})" if data["engine_key"] else "-")
        t.add_row("uptime", _uptime(data["uptime_s"]))
        if data["last_tokens_per_s"] is not None:
            t.add_row("last tokens/s", f"{data['last_tokens_per_s']:.1f}")
        elif data["smoke_tokens_per_s"]:
            t.add_row("last tokens/s", f"{data['smoke_tokens_per_s']:.1f} (the install's smoke test)")
        if data["log"]:
            t.add_row("log", data["log"])
        ui.console.print(t)
