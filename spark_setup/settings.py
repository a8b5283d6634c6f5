"""Where things live and how the product is configured, in one place.

Precedence for every value: command-line flag > environment (SPARK_SETUP_*) > config file
(~/.config/spark-setup/config.toml, or $SPARK_SETUP_CONFIG) > built-in default.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TARGETS = ("spark", "generic", "cpu")
ENV_PREFIX = "SPARK_SETUP_"


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_config_file() -> Path:
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / "spark-setup" / "config.toml"


def _defaults() -> dict[str, Any]:
    prefix = _home() / ".local" / "share" / "spark-setup"
    return {
        "prefix": prefix,
        "models_dir": None,  # derived: <prefix>/models
        "state_dir": None,  # derived: <prefix>/state
        "port": 8000,
        "host": "127.0.0.1",
        "target": "spark",
    }


def _parse_value(key: str, raw: Any, source: str) -> Any:
    """Validate one setting; bad values are a usage error naming the source."""
    if key in ("prefix", "models_dir", "state_dir"):
        if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
            raise UsageError(f"{key} from {source} must be a path, got {raw!r}", f"fix {key} in {source}")
        return Path(str(raw)).expanduser().absolute()
    if key == "port":
        try:
            port = int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"port from {source} must be an integer 1-65535, got {raw!r}", f"fix port in {source}")
        if not 1 <= port <= 65535:
            raise UsageError(f"port from {source} must be 1-65535, got {port}", f"fix port in {source}")
        return port
    if key == "host":
        if not isinstance(raw, str) or not raw.strip() or " " in raw:
            raise UsageError(f"host from {source} must be an address like 127.0.0.1, got {raw!r}", f"fix host in {source}")
        return raw.strip()
    if key == "target":
        if raw not in TARGETS:
            raise UsageError(
                f"target from {source} must be one of {', '.join(TARGETS)}, got {raw!r}", f"fix target in {source}"
            )
        return raw
    raise UsageError(f"unknown setting {key!r} in {source}", f"known settings: {', '.join(_defaults())}")


@dataclass(frozen=True)
class Settings:
    prefix: Path
    models_dir: Path
    state_dir: Path
    port: int
    host: str
    target: str
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    config_file: Path | None = None

    @property
    def engine_dir(self) -> Path:
        return self.prefix / "engine"

    @property
    def venv_dir(self) -> Path:
        return self.prefix / "venv"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in
                (("prefix", self.prefix), ("models_dir", self.models_dir), ("state_dir", self.state_dir),
                 ("port", self.port), ("host", self.host), ("target", self.target))}


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}", f"fix or remove {path}")
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}", f"check permissions of {path}")
    known = set(_defaults())
    for key in data:
        if key not in known:
            raise UsageError(f"unknown setting {key!r} in {path}", f"known settings: {', '.join(sorted(known))}")
    return data


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config_file: Path | None = None) -> Settings:
    """Resolve every setting with its source. `flags` holds only values given on the command line (None = unset)."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    cfg_path = config_file or default_config_file()
    cfg = load_config_file(cfg_path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in _defaults().items():
        env_key = ENV_PREFIX + key.upper()
        # Every source is validated, even one a higher source overrides: a broken config is always reported.
        candidates = []
        if key in flags:
            candidates.append((_parse_value(key, flags[key], f"--{key.replace('_', '-')}"), "flag"))
        if env.get(env_key):
            candidates.append((_parse_value(key, env[env_key], env_key), "env"))
        if key in cfg:
            candidates.append((_parse_value(key, cfg[key], str(cfg_path)), "config"))
        values[key], sources[key] = candidates[0] if candidates else (default, "default")
    if values["models_dir"] is None:
        values["models_dir"] = values["prefix"] / "models"
        sources["models_dir"] = f"derived from prefix ({sources['prefix']})"
    if values["state_dir"] is None:
        values["state_dir"] = values["prefix"] / "state"
        sources["state_dir"] = f"derived from prefix ({sources['prefix']})"
    return Settings(sources=sources, config_file=cfg_path, **values)
