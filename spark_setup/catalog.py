"""The model files we provision, and the pins that say exactly which bytes are "the" file.

Facts only (platform-facts §1). Sizes are approximate: the exact size, the commit and the SHA-256 are never
written here. They are resolved from the Hub on the first download (revision -> 40-hex commit, the file's
SHA-256 and size at that commit) and recorded as pins in the state dir; every later run verifies against the
pins. An administrator can supply known-good pins with `--pins FILE` (same JSON format as the state's pins.json).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError, UserError

REPO = "antirez/deepseek-v4-gguf"
DEFAULT_REVISION = "main"
DEFAULT_VARIANT = "q2-imatrix"
GiB = 1024**3

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Variant:
    name: str
    repo: str
    file: str
    approx_bytes: int  # from the published listing; the exact size comes from the Hub and is pinned
    kind: str  # "base" or "draft"
    memory_gib: float  # approximate resident memory to serve it (weights + runtime buffers at modest context)
    machine: str  # the machine class it is meant for
    drafts: tuple[str, ...] = ()  # for a base: the draft variants that pair with it
    pairs_with: tuple[str, ...] = ()  # for a draft: the bases it was made for
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drafts"], d["pairs_with"] = list(self.drafts), list(self.pairs_with)
        return d


_Q2 = "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2"
_Q4 = "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2"
_CHAT_V2_BASES = ("q2-imatrix", "q2", "q4-imatrix", "q4")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("q2-imatrix", REPO, f"{_Q2}-imatrix.gguf", int(80.76 * GiB), "base", 88.0, "DGX Spark (128 GB)",
                drafts=("mtp",), note="default: 2-bit experts quantized with an importance matrix"),
        Variant("q2", REPO, f"{_Q2}.gguf", int(80.76 * GiB), "base", 88.0, "DGX Spark (128 GB)",
                drafts=("mtp",), note="legacy 2-bit quant without imatrix"),
        Variant("q4-imatrix", REPO, f"{_Q4}-imatrix.gguf", int(153.3 * GiB), "base", 162.0, "256 GB machines",
                drafts=("mtp",), note="4-bit experts, imatrix; does not fit one Spark"),
        Variant("q4", REPO, f"{_Q4}.gguf", int(153.3 * GiB), "base", 162.0, "256 GB machines",
                drafts=("mtp",), note="4-bit experts; does not fit one Spark"),
        Variant("mtp", REPO, "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf", int(3.6 * GiB), "draft", 4.0,
                "any (added to a base)", pairs_with=_CHAT_V2_BASES,
                note="multi-token-prediction draft for the chat-v2 bases only (not the later -0731 checkpoints)"),
    )
}
BASES = tuple(n for n, v in VARIANTS.items() if v.kind == "base")


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown variant {name!r}", f"choose one of: {', '.join(VARIANTS)}") from None


def files_for(variant: str, with_mtp: bool) -> list[Variant]:
    """The catalog entries a download of `variant` (plus its draft when asked) needs, base first."""
    base = get_variant(variant)
    if base.kind != "base":
        raise UsageError(f"{variant!r} is a draft, not a base model",
                         f"pick a base ({', '.join(BASES)}) and add --with-mtp for the draft")
    out = [base]
    if with_mtp:
        if not base.drafts:
            raise UsageError(f"no draft pairs with {variant!r}", "drop --with-mtp")
        out += [VARIANTS[d] for d in base.drafts]
    return out


# ---------------------------------------------------------------- pins

@dataclass(frozen=True)
class Pin:
    repo: str
    file: str
    revision: str  # what was asked for (e.g. "main")
    commit: str  # 40-hex commit the revision resolved to
    sha256: str | None  # SHA-256 the Hub publishes for the file at that commit (None: not an LFS file)
    size: int
    git_oid: str | None = None  # the git blob id (used to verify non-LFS files, which have no SHA-256)
    pinned_at: str = ""
    source: str = "hub"  # "hub" (resolved on first download) or the pins file it came from

    @property
    def key(self) -> str:
        return f"{self.repo}/{self.file}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pins_path(state_dir: Path) -> Path:
    return Path(state_dir) / "pins.json"


def _parse_pin(raw: Any, where: str) -> Pin:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: each pin must be an object", "see `spark-setup models --json` for the format")
    try:
        repo, file, commit, size = str(raw["repo"]), str(raw["file"]), str(raw["commit"]).lower(), int(raw["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{where}: a pin needs repo, file, commit and size ({exc})",
                         "see `spark-setup models --json` for the format") from None
    sha = raw.get("sha256")
    sha = str(sha).lower() if sha else None
    if not _HEX40.match(commit):
        raise UsageError(f"{where}: pin for {file} has commit {commit!r}, not 40 hex digits", f"fix {where}")
    if sha is not None and not _HEX64.match(sha):
        raise UsageError(f"{where}: pin for {file} has sha256 {sha!r}, not 64 hex digits", f"fix {where}")
    if sha is None and not raw.get("git_oid"):
        raise UsageError(f"{where}: pin for {file} has neither sha256 nor git_oid", f"fix {where}")
    if size <= 0:
        raise UsageError(f"{where}: pin for {file} has size {size}", f"fix {where}")
    return Pin(repo, file, str(raw.get("revision") or commit), commit, sha, size,
               git_oid=(str(raw["git_oid"]).lower() if raw.get("git_oid") else None),
               pinned_at=str(raw.get("pinned_at", "")), source=str(raw.get("source", "hub")))


def read_pins_file(path: Path) -> dict[str, Pin]:
    """Pins from a JSON file: {"pins": [ {repo, file, revision, commit, sha256, size}, ... ]} or a bare list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"pins file {path} does not exist", "give the path of a pins JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"pins file {path} is not readable JSON: {exc}", f"fix or remove {path}") from None
    items = data.get("pins") if isinstance(data, dict) else data
    if isinstance(items, dict):  # keyed form, as we write it
        items = list(items.values())
    if not isinstance(items, list):
        raise UsageError(f"pins file {path} has no list of pins", 'expected {"pins": [...]}')
    pins = [_parse_pin(p, str(path)) for p in items]
    return {p.key: p for p in pins}


class PinStore:
    """The pins in force: the state dir's pins.json, overridden by an administrator's --pins FILE."""

    def __init__(self, state_dir: Path, extra: Path | None = None):
        self.path = pins_path(state_dir)
        self.local: dict[str, Pin] = read_pins_file(self.path) if self.path.exists() else {}
        self.extra: dict[str, Pin] = {}
        if extra is not None:
            self.extra = {k: Pin(**{**p.as_dict(), "source": str(extra)}) for k, p in read_pins_file(extra).items()}

    def get(self, repo: str, file: str) -> Pin | None:
        key = f"{repo}/{file}"
        return self.extra.get(key) or self.local.get(key)

    def all(self) -> list[Pin]:
        merged = {**self.local, **self.extra}
        return [merged[k] for k in sorted(merged)]

    def record(self, pin: Pin) -> None:
        """Write a pin into the state's pins.json (atomically)."""
        if not pin.pinned_at:
            pin = Pin(**{**pin.as_dict(), "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.local[pin.key] = pin
        write_json_atomic(self.path, {"version": 1, "pins": [self.local[k].as_dict() for k in sorted(self.local)]})

    def forget(self, repo: str, file: str) -> None:
        key = f"{repo}/{file}"
        if self.local.pop(key, None) is not None:
            write_json_atomic(self.path, {"version": 1, "pins": [self.local[k].as_dict() for k in sorted(self.local)]})
        self.extra.pop(key, None)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync it, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write {path}: {exc.strerror}", f"check free space and permissions of {path.parent}")

