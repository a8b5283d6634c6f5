"""The install receipt, `<state>/receipt.json`: what `spark-setup install` put on this machine and when.

It records versions, the model revision, the files with their SHA-256, the engine key, the units, and per step
the last outcome, so a re-run can skip finished steps in well under a second and `status`/`uninstall` know what
exists. Written atomically after every step; a damaged receipt is treated as absent (the steps re-check).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .settings import Settings

SCHEMA_VERSION = 1


def receipt_path(settings: Settings) -> Path:
    return settings.state_dir / "receipt.json"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load(settings: Settings) -> dict[str, Any]:
    try:
        data = json.loads(receipt_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("schema_version") == SCHEMA_VERSION else {}


def save(settings: Settings, data: dict[str, Any]) -> Path:
    path = receipt_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data)
    data.update(schema_version=SCHEMA_VERSION, updated=now_iso(),
                versions={"spark_setup": __version__, "python": platform.python_version()},
                settings={"prefix": str(settings.prefix), "models_dir": str(settings.models_dir),
                          "state_dir": str(settings.state_dir), "port": settings.port, "host": settings.host})
    data.setdefault("created", data["updated"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def host_key() -> str:
    """Cheap identity of this host + install (no probing): doctor's result is reused only while it holds."""
    u = os.uname()
    return f"{u.nodename}|{u.sysname}|{u.release}|{u.machine}|{__version__}|{sys.version_info[:2]}"


def file_stat_key(path: Path) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
