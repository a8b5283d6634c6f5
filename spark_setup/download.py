"""Resumable, parallel, verified model downloads from a Hugging Face hub (or a mirror at HF_ENDPOINT).

What happens for each file:
1. The pin in force (state dir's pins.json, or an administrator's --pins FILE) says which commit, SHA-256 and size
   the file must have. Without a pin, the revision (default "main") is resolved to its 40-hex commit and the
   SHA-256/size the Hub publishes for the file at that commit become the pin (HfApi.get_paths_info).
2. A file already verified (recorded in verified.json with its size, mtime and inode) is "verified, nothing to do"
   with no network and no re-hashing, unless --verify asks to re-hash it.
3. Otherwise a fresh HEAD on /resolve/ (every start and resume: CDN URLs expire) must agree with the pin; then the
   bytes are fetched into `<name>.part` (preallocated to the final size) by N connections, each fetching its own
   byte ranges with `Range` and writing them at their offsets. The sidecar `<name>.part.json` records the completed
   ranges and is rewritten atomically (after an fdatasync of the data it vouches for) about once a second.
4. A hasher thread reads completed ranges back in order while the transfer runs, so the SHA-256 is ready moments
   after the last byte. Only a file whose SHA-256 equals the pin is renamed (atomically) to its final name.

Why the byte transfer is our own and not huggingface_hub's: hf_hub_download cannot resume across processes (a new
random .incomplete file per attempt), refuses >50 GB over plain HTTP, fetches over a single stream, and checks no
SHA-256 (platform-facts §2); huggingface_hub stays our tool for metadata (get_hf_file_metadata, get_paths_info)
and tokens (get_token).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urljoin, urlsplit

import httpx

from . import catalog
from .catalog import Pin, PinStore, write_json_atomic
from .errors import UsageError, UserError
from .settings import Settings

MiB = 1024**2
GiB = 1024**3
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 32
SIDECAR_VERSION = 1
DEFAULT_ENDPOINT = "https://huggingface.co"


# ---------------------------------------------------------------- small helpers

def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def endpoint() -> str:
    """HF_ENDPOINT (mirrors, tests) read at call time, so a changed environment is honoured."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _origin(url: str) -> tuple[str, str]:
    p = urlsplit(url)
    return (p.scheme, p.netloc.lower())


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def resolve_url(repo: str, file: str, revision: str) -> str:
    return f"{endpoint()}/{repo}/resolve/{quote(revision, safe='')}/{quote(file)}"


def get_token(token: str | None) -> str | None:
    """--token, else HF_TOKEN, else the token huggingface_hub stored (`hf auth login`)."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token as hf_get_token

    return hf_get_token()


def is_offline(offline: bool) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- targets and results

@dataclass(frozen=True)
class Target:
    """One file to provision: where it comes from and where it goes."""

    repo: str
    file: str
    dest: Path
    label: str  # variant name, or the file name for --repo/--file

    @property
    def key(self) -> str:
        return f"{self.repo}/{self.file}"

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def sidecar(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part.json")

    @property
    def corrupt(self) -> Path:
        return self.dest.with_name(self.dest.name + ".corrupt")

    @property
    def lockfile(self) -> Path:
        return self.dest.with_name("." + self.dest.name + ".lock")


@dataclass
class DownloadResult:
    files: list[dict[str, Any]]  # {path, sha256, size, repo, revision, commit, file, label, status}
    skipped: bool  # True when everything was already verified and nothing was fetched or hashed
    current: str | None = None  # models/current.gguf when a base variant was provisioned
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "skipped": self.skipped, "current": self.current, "notes": self.notes}


def dest_for(models_dir: Path, repo: str, file: str) -> Path:
    """Catalog repo files live directly in the models dir; other repos get a folder of their own."""
    if repo == catalog.REPO:
        return Path(models_dir) / file
    return Path(models_dir) / repo.replace("/", "--") / file


# ---------------------------------------------------------------- verified-file record

def _verified_path(state_dir: Path) -> Path:
    return Path(state_dir) / "verified.json"


def load_verified(state_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_verified_path(state_dir).read_text(encoding="utf-8"))
        return data.get("files", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _update_verified(state_dir: Path, dest: Path, entry: dict[str, Any] | None) -> None:
    path = _verified_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".verified.lock"), "w") as lk:  # serialise read-modify-write between processes
        fcntl.flock(lk, fcntl.LOCK_EX)
        files = load_verified(state_dir)
        if entry is None:
            files.pop(str(dest), None)
        else:
            files[str(dest)] = entry
        write_json_atomic(path, {"version": 1, "files": files})


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def is_verified(dest: Path, pin: Pin | None, record: dict[str, Any]) -> bool:
    """True when `dest` is the file we verified against this pin and has not been touched since."""
    if pin is None:
        return False
    rec = record.get(str(dest))
    if not rec:
        return False
    try:
        st = os.stat(dest)
    except OSError:
        return False
    same = rec.get("sha256") == pin.sha256 if pin.sha256 else rec.get("git_oid") == pin.git_oid
    return rec.get("commit") == pin.commit and same and st.st_size == pin.size and rec.get("stat") == _stat_key(st)


def _record_verified(state_dir: Path, t: Target, pin: Pin, sha256: str) -> None:
    st = os.stat(t.dest)
    _update_verified(state_dir, t.dest, {
        "repo": t.repo, "file": t.file, "commit": pin.commit, "revision": pin.revision, "sha256": sha256,
        "git_oid": pin.git_oid if pin.sha256 is None else None, "stat": _stat_key(st),
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, str]:
    """(SHA-256, git blob id) of a whole file, read in big blocks; drops the pages it read from the cache."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    g = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb", buffering=0) as f:
        fd, pos = f.fileno(), 0
        while True:
            buf = f.read(MiB)
            if not buf:
                break
            h.update(buf)
            g.update(buf)
            pos += len(buf)
            if progress:
                progress(len(buf))
            if pos % (256 * MiB) == 0:
                _drop_cache(fd, 0, pos)
        _drop_cache(fd, 0, pos)
    return h.hexdigest(), g.hexdigest()


def _drop_cache(fd: int, start: int, length: int) -> None:
    # On a GB10 the page cache competes with the model for the same unified memory (platform-facts §3).
    try:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def _matches_pin(pin: Pin, sha256: str, git_oid: str) -> bool:
    return sha256 == pin.sha256 if pin.sha256 else git_oid == pin.git_oid


# ---------------------------------------------------------------- progress reporting

class Reporter:
    """Progress sink. The base class is silent; download code calls these, command modules choose a renderer."""

    def start(self, name: str, total: int, done: int) -> None: ...
    def update(self, name: str, done: int, conns: int) -> None: ...
    def finish(self, name: str, status: str) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class LogReporter(Reporter):
    """Periodic one-line progress on stderr, for logs, --json runs and non-TTY output."""

    def __init__(self, interval: float | None = None, stream=None):
        self.interval = _env_float("SPARK_SETUP_LOG_INTERVAL", 30.0) if interval is None else interval
        self.stream = stream or sys.stderr
        self.state: dict[str, list[float]] = {}

    def _line(self, text: str) -> None:
        print(f"download: {text}", file=self.stream, flush=True)

    def start(self, name, total, done):
        self.state[name] = [total, done, time.monotonic(), done, time.monotonic()]
        self._line(f"{name}: {human(total)}" + (f", resuming at {human(done)}" if done else ""))

    def update(self, name, done, conns):
        st = self.state.get(name)
        if not st:
            return
        now = time.monotonic()
        if now - st[4] < self.interval:
            return
        total = st[0]
        rate = (done - st[3]) / max(1e-6, now - st[2])
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_s = "?" if math.isinf(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self._line(f"{name}: {human(done)} / {human(total)} ({100 * done / max(1, total):.0f}%), "
                   f"{rate / 1e6:.0f} MB/s, ETA {eta_s}, {conns} connections")
        st[1], st[4] = done, now

    def finish(self, name, status):
        self._line(f"{name}: {status}")

    def note(self, text):
        self._line(text)


class RichReporter(Reporter):
    """One rich bar per file (bytes, rate, ETA, connections) and a total bar, on stderr."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                 TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[conns]}"),
                                 console=self.console, transient=False)
        self.tasks: dict[str, Any] = {}
        self.done: dict[str, int] = {}
        self.total_task = None
        self.progress.start()

    def start(self, name, total, done):
        if self.total_task is None:
            self.total_task = self.progress.add_task("total", total=0, completed=0, conns="")
        short = name if len(name) <= 40 else name[:18] + "…" + name[-21:]
        self.tasks[name] = self.progress.add_task(short, total=total, completed=done, conns="")
        self.done[name] = done
        t = self.progress.tasks[self.total_task]
        self.progress.update(self.total_task, total=(t.total or 0) + total, completed=t.completed + done)

    def update(self, name, done, conns):
        if name not in self.tasks:
            return
        delta = done - self.done[name]
        self.done[name] = done
        self.progress.update(self.tasks[name], completed=done, conns=f"{conns} conn")
        if delta:
            self.progress.advance(self.total_task, delta)

    def finish(self, name, status):
        if name in self.tasks:
            self.progress.update(self.tasks[name], conns=status)

    def note(self, text):
        self.progress.console.print(text, highlight=False)

    def close(self):
        self.progress.stop()


def make_reporter(progress: bool | Reporter | None) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    if not progress:
        return Reporter()
    return RichReporter() if sys.stderr.isatty() else LogReporter()


# ---------------------------------------------------------------- talking to the hub (metadata)

@dataclass
class Remote:
    commit: str
    size: int
    sha256: str | None  # X-Linked-Etag / lfs.sha256 (None for a non-LFS file)
    git_oid: str | None
    url: str  # where the bytes are (CDN location or the /resolve/ URL itself)
    resolve_url: str


def _hub_error(exc: Exception, repo: str, file: str, revision: str, token: str | None) -> UserError:
    from huggingface_hub import errors as hfe

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hfe.GatedRepoError) or (status in (401, 403) and not isinstance(exc, hfe.RepositoryNotFoundError)):
        if token:
            return UserError(f"access to {repo} was refused (HTTP {status}) with the token given",
                             f"check the token's permissions and accept the terms at {endpoint()}/{repo}")
        return UserError(f"{repo} needs a Hugging Face token (HTTP {status or 401}: gated or private)",
                         "pass --token hf_..., or set HF_TOKEN, or run `hf auth login`; accept the repo's terms "
                         "on its page first")
    if isinstance(exc, hfe.RevisionNotFoundError):
        return UserError(f"revision {revision!r} not found in {repo}", "check --revision (a branch, tag or commit)")
    if isinstance(exc, hfe.RemoteEntryNotFoundError):
        return UserError(f"file {file} not found in {repo} at revision {revision!r}",
                         "check the file name (see the repo's file list) and --revision")
    if isinstance(exc, hfe.RepositoryNotFoundError):
        return UserError(f"repository {repo} not found at {endpoint()} (HTTP {status})",
                         "check the repo name; a private repo also needs a token (--token or HF_TOKEN)"
                         + ("" if token else ""))
    if status == 404:
        return UserError(f"{file} not found in {repo} at revision {revision!r} (HTTP 404)",
                         "check the repo, file and --revision")
    if status is not None:
        return UserError(f"the hub answered HTTP {status} for {file} in {repo}",
                         "try again later; progress is kept and the next run resumes")
    return UserError(f"cannot reach {endpoint()}: {type(exc).__name__}: {exc}".rstrip(": "),
                     "check the network (or HF_ENDPOINT); --offline uses only what is on disk")


def head(repo: str, file: str, revision: str, token: str | None) -> Remote:
    """A fresh HEAD on /resolve/: commit, size, published SHA-256 and the current download URL."""
    from huggingface_hub import get_hf_file_metadata

    url = resolve_url(repo, file, revision)
    try:
        meta = get_hf_file_metadata(url, token=token or False, timeout=_env_float("SPARK_SETUP_HEAD_TIMEOUT", 20),
                                    endpoint=endpoint(), retry_on_errors=True)
    except Exception as exc:  # huggingface_hub's HTTP errors, or httpx transport errors
        raise _hub_error(exc, repo, file, revision, token) from None
    etag = (meta.etag or "").lower()
    commit = (meta.commit_hash or "").lower()
    if len(commit) != 40 or meta.size is None:
        raise UserError(f"{endpoint()} gave no commit or size for {file} in {repo} at {revision!r}",
                        "is HF_ENDPOINT a Hugging Face hub or mirror?")
    sha = etag if len(etag) == 64 else None
    oid = etag if len(etag) == 40 else None
    return Remote(commit=commit, size=int(meta.size), sha256=sha, git_oid=oid, url=meta.location, resolve_url=url)


def published_pin(repo: str, file: str, revision: str, remote: Remote, token: str | None) -> Pin:
    """The pin for a first download: the commit from the HEAD, SHA-256 and size from the Hub's file metadata."""
    from huggingface_hub import HfApi

    sha, size, oid = remote.sha256, remote.size, remote.git_oid
    try:
        infos = HfApi(endpoint=endpoint()).get_paths_info(repo, [file], revision=remote.commit, token=token or False)
    except Exception as exc:
        if remote.sha256 is None and remote.git_oid is None:
            raise _hub_error(exc, repo, file, revision, token) from None
        infos = []  # a mirror without the API: the HEAD's X-Linked-Etag/X-Linked-Size are the published values
    info = next((i for i in infos if getattr(i, "path", None) == file), None)
    if info is not None:
        if getattr(info, "lfs", None) is not None:
            sha, size = info.lfs.sha256.lower(), int(info.lfs.size)
        else:
            sha, oid, size = None, info.blob_id.lower(), int(info.size)
        if remote.sha256 and sha and remote.sha256 != sha:
            raise UserError(f"the hub disagrees with itself about {file}: HEAD says SHA-256 {remote.sha256[:12]}…, "
                            f"file metadata says {sha[:12]}… at commit {remote.commit[:12]}",
                            "try again later, or supply known-good pins with --pins FILE")
    if size != remote.size:
        raise UserError(f"the hub disagrees with itself about {file}: size {size} vs {remote.size}",
                        "try again later, or supply known-good pins with --pins FILE")
    if sha is None and oid is None:
        raise UserError(f"the hub publishes no checksum for {file} in {repo}", "supply one with --pins FILE")
    return Pin(repo=repo, file=file, revision=revision, commit=remote.commit, sha256=sha, size=size,
               git_oid=oid if sha is None else None)


def check_remote_against_pin(t: Target, remote: Remote, pin: Pin, asked: str) -> None:
    """Refuse when the hub now serves something other than the pinned bytes."""
    wrong_sha = pin.sha256 is not None and remote.sha256 is not None and remote.sha256 != pin.sha256
    if remote.size != pin.size or wrong_sha:
        got = f"SHA-256 {remote.sha256[:12]}…" if remote.sha256 else f"{remote.size} bytes"
        want = f"SHA-256 {pin.sha256[:12]}…" if pin.sha256 else f"{pin.size} bytes"
        raise UserError(
            f"{t.file} at {asked!r} is now {got} ({remote.size} bytes, commit {remote.commit[:12]}) but the pin says "
            f"{want} ({pin.size} bytes, commit {pin.commit[:12]}): the file was replaced upstream; refusing",
            f"local files are untouched; to move to the new file on purpose re-run with --repin"
            + (f" (pin from {pin.source})" if pin.source != "hub" else ""))


# ---------------------------------------------------------------- the ranged parallel transfer

class _Stop:
    def __init__(self):
        self.event = threading.Event()
        self.signum = 0

    def set(self, signum: int = 0) -> None:
        self.signum = self.signum or signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class _Retry(Exception):
    pass


class _Fatal(Exception):
    def __init__(self, error: UserError):
        super().__init__(error.message)
        self.error = error


MAX_SPAN = 4  # chunks per request: big requests (few round trips), fine-grained completion (small resume loss)


def _chunk_size(size: int, conns: int) -> int:
    """The unit of completion, resume and in-order hashing: at most 16 MiB, so the ranges still in flight at the
    end (what the hasher has left when the last byte lands) stay small; requests span up to MAX_SPAN of them."""
    target = size // max(1, conns * 8)
    return int(min(16 * MiB, max(256 * 1024, target)) // (64 * 1024) * (64 * 1024))


class Fetch:
    """One file's transfer into `.part` with N connections, sidecar bookkeeping and in-order hashing."""

    def __init__(self, t: Target, pin: Pin, remote: Remote, conns: int, token: str | None, reporter: Reporter,
                 stop: _Stop, reresolve: Callable[[], Remote]):
        self.t, self.pin, self.remote, self.token = t, pin, remote, token
        self.conns = max(1, min(conns, MAX_CONNECTIONS))
        self.reporter, self.stop, self.reresolve = reporter, stop, reresolve
        self.size = pin.size
        self.lock = threading.Lock()
        self.flush_lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.abort = threading.Event()  # internal: a fatal error or the switch to one sequential stream
        self.error: UserError | None = None
        self.sequential_owner: int | None = None
        self._marks: dict[int, tuple[int, int]] = {}  # per connection: next chunk to mark, last chunk of its span
        self.url = remote.url
        self.hub_origin = _origin(endpoint())
        self.read_timeout = _env_float("SPARK_SETUP_READ_TIMEOUT", 30.0)
        self.max_retries = int(_env_float("SPARK_SETUP_MAX_RETRIES", 8))
        self.active = 0
        self.received = 0  # bytes received in this run (for tests and rates)
        self.digest: str | None = None
        self.git_digest: str | None = None

    # ---- sidecar
    def _load_sidecar(self) -> set[int]:
        try:
            sc = json.loads(self.t.sidecar.read_text(encoding="utf-8"))
            st = os.stat(self.t.part)
        except (OSError, ValueError):
            return set()
        if (sc.get("version") != SIDECAR_VERSION or sc.get("size") != self.size or st.st_size != self.size
                or sc.get("sha256") != self.pin.sha256 or sc.get("commit") != self.pin.commit
                or not isinstance(sc.get("chunk_size"), int) or sc["chunk_size"] <= 0):
            return set()
        self.chunk = sc["chunk_size"]
        self.nchunks = math.ceil(self.size / self.chunk)
        done: set[int] = set()
        for r in sc.get("completed", []):
            try:
                a, b = int(r[0]), int(r[1])
            except (TypeError, ValueError, IndexError):
                return set()
            if a % self.chunk or not (b % self.chunk == 0 or b == self.size) or b > self.size:
                return set()
            done.update(range(a // self.chunk, math.ceil(b / self.chunk)))
        return done

    def _ranges(self, done: set[int]) -> list[list[int]]:
        out: list[list[int]] = []
        for i in sorted(done):
            a, b = i * self.chunk, min(self.size, (i + 1) * self.chunk)
            if out and out[-1][1] == a:
                out[-1][1] = b
            else:
                out.append([a, b])
        return out

    def flush(self, covering: int | None = None) -> None:
        """fdatasync the data, then atomically rewrite the sidecar with the ranges that data covers.

        Workers call it with the chunk they just finished before taking the next one, so a kill at any moment
        loses at most the one range in flight per connection."""
        with self.flush_lock:
            if covering is not None and covering in self.flushed:
                return  # another connection's flush already recorded it
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            done = set(self.done)
        try:
            os.fdatasync(self.fd)
            write_json_atomic(self.t.sidecar, {
                "version": SIDECAR_VERSION, "repo": self.t.repo, "file": self.t.file, "url": self.remote.resolve_url,
                "revision": self.pin.revision, "commit": self.pin.commit, "sha256": self.pin.sha256,
                "size": self.size, "chunk_size": self.chunk, "completed": self._ranges(done),
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self.flushed = done
        except (OSError, UserError):
            pass  # disk full or similar: the previous sidecar stays valid (it vouches for less)
        if self.hashed_upto:
            _drop_cache(self.fd, 0, self.hashed_upto)

    def done_bytes(self, done: set[int] | None = None) -> int:
        done = self.done if done is None else done
        return sum(min(self.size, (i + 1) * self.chunk) - i * self.chunk for i in done)

    # ---- workers
    def _next_span(self) -> tuple[int, int] | None:
        """The lowest pending chunk and up to MAX_SPAN-1 pending neighbours (fewer near the end, so the tail
        spreads over all connections)."""
        with self.lock:
            if not self.pending:
                return None
            k = max(1, min(MAX_SPAN, len(self.pending) // self.conns))
            first = last = self.pending.pop(0)
            while k > 1 and self.pending and self.pending[0] == last + 1:
                last = self.pending.pop(0)
                k -= 1
            return first, last

    def _mark_done(self, idx: int) -> None:
        with self.cond:
            self.done.add(idx)
            self.cond.notify_all()

    def _count(self, n: int) -> None:
        with self.lock:
            self.received += n
            self.t_last_byte = time.monotonic()

    def _request_headers(self, url: str) -> dict[str, str]:
        h = {"Accept-Encoding": "identity", "User-Agent": "spark-setup"}
        if self.token and _origin(url) == self.hub_origin:  # never hand the token to a CDN
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _open(self, client: httpx.Client, pos: int, end: int) -> httpx.Response:
        url = self.url
        for _ in range(6):
            headers = self._request_headers(url)
            headers["Range"] = f"bytes={pos}-{end}"
            r = client.send(client.build_request("GET", url, headers=headers), stream=True)
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                r.close()
                url = urljoin(url, r.headers["Location"])
                continue
            return r
        raise _Retry("too many redirects")

    def _worker(self, wid: int) -> None:
        timeout = httpx.Timeout(connect=20.0, read=self.read_timeout, write=20.0, pool=20.0)
        with httpx.Client(timeout=timeout, follow_redirects=False, http2=False) as client:
            while not (self.stop.is_set() or self.abort.is_set()):
                span = self._next_span()
                if span is None:
                    return
                with self.lock:
                    self.active += 1
                try:
                    self._fetch_span(client, wid, *span)
                except _Fatal as exc:
                    with self.lock:
                        self.error = self.error or exc.error
                    self.abort.set()
                    with self.cond:
                        self.cond.notify_all()
                finally:
                    with self.lock:
                        self.active -= 1

    def _fetch_span(self, client: httpx.Client, wid: int, first: int, last_idx: int) -> None:
        start = first * self.chunk
        end = min(self.size, (last_idx + 1) * self.chunk) - 1
        self._marks[wid] = (first, last_idx)
        pos, attempts, last = start, 0, ""
        while pos <= end:
            if self.stop.is_set() or (self.abort.is_set() and self.sequential_owner != wid):
                return
            before = pos
            try:
                r = self._open(client, pos, end)
                try:
                    pos = self._consume(r, wid, pos, end)
                finally:
                    r.close()
                if pos == -1:  # switched to one sequential stream, which wrote everything
                    return
                if pos <= end:
                    raise _Retry(f"connection closed after {pos - before} bytes")
            except _Retry as exc:
                last = str(exc)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if pos > end:
                break
            attempts = 1 if pos > before else attempts + 1
            if attempts > self.max_retries:
                raise _Fatal(UserError(f"downloading {self.t.file} kept failing ({last})",
                                       "check the network and re-run: progress is saved and the next run resumes"))
            delay = min(30.0, 0.25 * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            if self.stop.event.wait(delay):
                return
        self._completed_upto(wid, end + 1)

    def _completed_upto(self, wid: int, pos: int) -> None:
        """Mark (and record in the sidecar) every chunk of this connection's span that ends at or before pos."""
        nxt, last = self._marks[wid]
        while nxt <= last and min(self.size, (nxt + 1) * self.chunk) <= pos:
            self._mark_done(nxt)
            self.flush(covering=nxt)
            nxt += 1
        self._marks[wid] = (nxt, last)

    def _consume(self, r: httpx.Response, wid: int, pos: int, end: int) -> int:
        code = r.status_code
        if code == 206:
            cr = r.headers.get("Content-Range", "")
            try:
                unit, rest = cr.split(" ", 1)
                span, total = rest.split("/", 1)
                a, b = (int(x) for x in span.split("-", 1))
            except ValueError:
                raise _Retry(f"bad Content-Range {cr!r}") from None
            if total not in ("*", str(self.size)):
                raise _Fatal(UserError(
                    f"{self.t.file} changed on the server during the download (now {total} bytes, pinned {self.size})",
                    "re-run; if it persists the file was replaced upstream (see `spark-setup models`)"))
            if unit != "bytes" or a != pos or b > end:
                raise _Retry(f"server sent range {a}-{b}, asked {pos}-{end}")
            return self._write_stream(r, wid, pos, b)
        if code == 200:
            return self._sequential(r, wid)
        if code in (401, 403, 404, 410):
            # A signed CDN URL expired, or the hub changed its mind: a fresh HEAD says which (and raises if gone).
            try:
                self.remote = self.reresolve()
            except UserError as exc:
                raise _Fatal(exc) from None
            self.url = self.remote.url
            raise _Retry(f"HTTP {code} from {urlsplit(r.url.__str__()).netloc}; re-resolved the URL")
        if code == 416:
            raise _Fatal(UserError(f"the server refused range {pos}-{end} of {self.t.file} (HTTP 416): "
                                   "the file changed size upstream", "re-run; if it persists check the pin"))
        if code == 429 or code >= 500:
            raise _Retry(f"HTTP {code}")
        raise _Fatal(UserError(f"unexpected HTTP {code} while downloading {self.t.file}",
                               "re-run; if it persists report it with the URL"))

    def _write_stream(self, r: httpx.Response, wid: int, pos: int, last: int) -> int:
        for buf in r.iter_raw(1 * MiB):
            n = len(buf)
            if pos + n > last + 1:
                raise _Retry("server sent more bytes than the range")
            self._pwrite(buf, pos)
            pos += n
            self._count(n)
            self._completed_upto(wid, pos)
            if self.stop.is_set() or self.abort.is_set():
                return pos
        return pos

    def _sequential(self, r: httpx.Response, wid: int) -> int:
        """The server ignored Range and sent the whole file from byte 0: take it in one stream, safely."""
        length = r.headers.get("Content-Length")
        if length is not None and int(length) != self.size:
            raise _Fatal(UserError(f"{self.t.file} changed on the server (now {length} bytes, pinned {self.size})",
                                   "re-run; if it persists the file was replaced upstream"))
        with self.lock:
            if self.sequential_owner is not None and self.sequential_owner != wid:
                return -1
            self.sequential_owner = wid
        self.abort.set()  # the other connections stop; this one writes everything
        pos = 0
        for buf in r.iter_raw(1 * MiB):
            if pos + len(buf) > self.size:
                raise _Fatal(UserError(f"the server sent more than {self.size} bytes for {self.t.file}", "re-run"))
            self._pwrite(buf, pos)
            first, pos = pos // self.chunk, pos + len(buf)
            self._count(len(buf))
            for i in range(first, self.nchunks):
                if min(self.size, (i + 1) * self.chunk) <= pos:
                    if i not in self.done:
                        self._mark_done(i)
                else:
                    break
            if self.stop.is_set():
                return -1
        if pos != self.size:
            raise _Retry(f"stream ended at {pos} of {self.size} bytes")
        with self.lock:
            self.pending.clear()
        return -1

    def _pwrite(self, buf: bytes, pos: int) -> None:
        try:
            view = memoryview(buf)
            while view:
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _Fatal(disk_full_error(self.t.dest.parent, self.size - self.done_bytes())) from None
            raise _Fatal(UserError(f"cannot write {self.t.part}: {exc.strerror}",
                                   f"check {self.t.part.parent}")) from None

    # ---- hashing in order, while the transfer runs
    def _hasher(self) -> None:
        h = hashlib.sha256()
        g = hashlib.sha1(b"blob %d\0" % self.size) if self.pin.sha256 is None else None
        for i in range(self.nchunks):
            with self.cond:
                while i not in self.done and not (self.stop.is_set() or self.abort.is_set() and
                                                   self.sequential_owner is None):
                    self.cond.wait(0.5)
                if i not in self.done:
                    return
            a, b = i * self.chunk, min(self.size, (i + 1) * self.chunk)
            while a < b:
                buf = os.pread(self.fd, min(MiB, b - a), a)  # cache-sized blocks: hashed while still hot
                if not buf:
                    return
                h.update(buf)
                if g is not None:
                    g.update(buf)
                a += len(buf)
            self.hashed_upto = b
        self.digest = h.hexdigest()
        self.git_digest = g.hexdigest() if g is not None else None

    # ---- the whole file
    def run(self) -> str:
        t = self.t
        self.chunk = _chunk_size(self.size, self.conns)
        self.nchunks = math.ceil(self.size / self.chunk)
        self.hashed_upto = 0
        done = self._load_sidecar()
        if not done and (t.part.exists() or t.sidecar.exists()):
            self.chunk = _chunk_size(self.size, self.conns)
            self.nchunks = math.ceil(self.size / self.chunk)
        self.done: set[int] = done
        self.flushed = set(done)
        self.pending = [i for i in range(self.nchunks) if i not in done]
        t.part.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(t.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            return self._run()
        finally:
            os.close(self.fd)

    def _preallocate(self) -> None:
        if os.fstat(self.fd).st_size != self.size or not self.done:
            try:
                os.ftruncate(self.fd, self.size)
                os.posix_fallocate(self.fd, 0, self.size)  # reserve the blocks now: no ENOSPC half-way
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full_error(self.t.dest.parent, self.size - self.done_bytes()) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise UserError(f"cannot create {self.t.part}: {exc.strerror}",
                                    f"check {self.t.part.parent}") from None

    def _run(self) -> str:
        t = self.t
        already = self.done_bytes()
        self._preallocate()
        self.flush()
        self.reporter.start(t.file, self.size, already)
        self.t_start = self.t_last_byte = time.monotonic()
        hasher = threading.Thread(target=self._hasher, name="sha256", daemon=True)
        hasher.start()
        workers = [threading.Thread(target=self._worker, args=(w,), name=f"conn{w}", daemon=True)
                   for w in range(min(self.conns, len(self.pending)))]
        for w in workers:
            w.start()
        last_flush = time.monotonic()
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(0.1)
            self.reporter.update(t.file, already + self.received, self.active)
            if time.monotonic() - last_flush >= 1.0:
                self.flush()
                last_flush = time.monotonic()
            if self.stop.is_set():
                deadline = time.monotonic() + 3.0
                for w in workers:
                    w.join(max(0.0, deadline - time.monotonic()))
                break
        self.flush()
        if self.stop.is_set():
            sig = self.stop.signum or signal.SIGINT
            name = signal.Signals(sig).name
            raise UserError(f"interrupted by {name} during {t.file}: {human(self.done_bytes(self.flushed))} of "
                            f"{human(self.size)} saved in {t.part.name}", "run the same command again to resume",
                            exit_code=128 + int(sig))
        if self.error is not None:
            raise self.error
        if len(self.done) != self.nchunks:
            raise UserError(f"downloading {t.file} stopped early ({human(self.done_bytes())} of {human(self.size)})",
                            "re-run to resume")
        hasher.join()
        self.t_hashed = time.monotonic()
        if self.digest is None:
            raise UserError(f"could not hash {t.part}", "re-run to resume")
        os.fsync(self.fd)
        return self.digest


def disk_full_error(where: Path, needed: int) -> UserError:
    free = shutil.disk_usage(_existing(where)).free
    return UserError(f"disk full at {where}: {human(free)} free, {human(needed)} more needed",
                     "free some space (or use --models-dir on a bigger disk) and re-run; nothing downloaded is lost")


def _existing(p: Path) -> Path:
    p = Path(p)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# ---------------------------------------------------------------- locking

class FileLock:
    """One download per file at a time: a second run refuses instead of corrupting the .part."""

    def __init__(self, t: Target):
        self.t = t
        self.fh = None

    def __enter__(self):
        self.t.lockfile.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.t.lockfile, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            pid = self.fh.read().strip() or "?"
            self.fh.close()
            raise UserError(f"another spark-setup download of {self.t.file} is running (pid {pid})",
                            "wait for it to finish (or stop it) and re-run; it resumes where that one stopped")
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


class _Signals:
    """SIGINT/SIGTERM set the stop flag (workers finish their write, the sidecar is flushed, exit 130/143);
    outside a transfer (hashing, a HEAD) the stop is checked between steps; a second signal stops at once."""

    def __init__(self, stop: _Stop):
        self.stop, self.old = stop, {}

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set():
            raise interrupted(signum, "before progress could be saved")
        self.stop.set(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the public entry points

def interrupted(signum: int, what: str) -> UserError:
    return UserError(f"interrupted by {signal.Signals(signum).name} {what}", "run the same command again to resume",
                     exit_code=128 + int(signum))


def _check_stop(stop: _Stop, what: str) -> None:
    if stop.is_set():
        raise interrupted(stop.signum or signal.SIGINT, what)


def _file_result(t: Target, pin: Pin, sha256: str | None, status: str) -> dict[str, Any]:
    return {"path": str(t.dest), "file": t.file, "label": t.label, "repo": t.repo, "revision": pin.revision,
            "commit": pin.commit, "sha256": sha256 or pin.sha256, "size": pin.size, "status": status}


def fetch_targets(settings: Settings, targets: list[Target], *, connections: int = DEFAULT_CONNECTIONS,
                  verify: bool = False, offline: bool = False, revision: str | None = None,
                  token: str | None = None, progress: bool | Reporter = True, pins_file: Path | None = None,
                  repin: bool = False) -> DownloadResult:
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be 1-{MAX_CONNECTIONS}, got {connections}", "the default is 8")
    if repin and pins_file is not None:
        raise UsageError("--repin and --pins contradict each other", "drop one of them")
    state = settings.state_dir
    store = PinStore(state, pins_file)
    for t in targets:  # an administrator's pins become this machine's pins (later runs need no --pins)
        admin = store.extra.get(t.key)
        if admin is not None and store.local.get(t.key) != admin:
            store.record(admin)
    record = load_verified(state)
    results: dict[str, dict[str, Any]] = {}

    def pin_applies(pin: Pin | None) -> bool:
        return pin is not None and not repin and revision in (None, pin.commit)

    # 1. Nothing to do? No network, no hashing.
    todo = []
    for t in targets:
        pin = store.get(t.repo, t.file)
        if pin_applies(pin) and not verify and is_verified(t.dest, pin, record):
            results[t.key] = _file_result(t, pin, record[str(t.dest)]["sha256"], "verified")
        else:
            todo.append(t)
    if not todo:
        return DownloadResult(files=[results[t.key] for t in targets], skipped=True)

    reporter = make_reporter(progress)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        reporter.note(text)

    stop = _Stop()
    try:
        with _Signals(stop):
            # 2. Files on disk with a pin: check them locally (no network needed).
            remaining = []
            for t in todo:
                pin = store.get(t.repo, t.file)
                if pin_applies(pin) and t.dest.exists():
                    reporter.start(f"{t.file} (verify)", os.path.getsize(t.dest), 0)
                    hashed = [0]

                    def tick(n: int, name=f"{t.file} (verify)") -> None:
                        hashed[0] += n
                        reporter.update(name, hashed[0], 0)
                        _check_stop(stop, f"while verifying {name}")

                    sha, oid = hash_file(t.dest, tick)
                    if os.path.getsize(t.dest) == pin.size and _matches_pin(pin, sha, oid):
                        _record_verified(state, t, pin, sha)
                        results[t.key] = _file_result(t, pin, sha, "verified")
                        note(f"{t.file}: SHA-256 matches the pin")
                        continue
                    os.replace(t.dest, t.corrupt)
                    _update_verified(state, t.dest, None)
                    note(f"{t.file} on disk does not match its pin (SHA-256 {sha[:12]}…): moved to {t.corrupt.name}")
                remaining.append(t)
            if remaining and is_offline(offline):
                missing = [f"{t.file} ({human(_part_done(t))} of it downloaded)" if t.part.exists() else t.file
                           for t in remaining]
                raise UserError(f"offline, and not on disk (verified): {', '.join(missing)}",
                                "run without --offline (and without HF_HUB_OFFLINE) to download")
            if not remaining:
                return DownloadResult(files=[results[t.key] for t in targets], skipped=False, notes=notes)

            # 3. Fresh HEADs: agree with the pins (or make them), then check the disk for everything left.
            tok = get_token(token)
            plans = []
            for t in remaining:
                pin = store.get(t.repo, t.file)
                if pin is not None and not pin_applies(pin):
                    asked = revision or pin.revision
                    remote = head(t.repo, t.file, asked, tok)
                    if repin:
                        pin = None
                    elif remote.commit != pin.commit:
                        if (pin.sha256 and remote.sha256 == pin.sha256) and remote.size == pin.size:
                            note(f"{t.file}: {asked!r} is commit {remote.commit[:12]}, same file as the pin")
                        else:
                            check_remote_against_pin(t, remote, pin, asked)
                else:
                    asked = pin.commit if pin is not None else (revision or catalog.DEFAULT_REVISION)
                    remote = head(t.repo, t.file, asked, tok)
                _check_stop(stop, "while asking the hub")
                if pin is None:
                    pin = published_pin(t.repo, t.file, asked, remote, tok)
                    store.record(pin)
                    note(f"{t.file}: pinned commit {pin.commit[:12]}, SHA-256 "
                         f"{(pin.sha256 or pin.git_oid or '')[:12]}…, {human(pin.size)}")
                else:
                    check_remote_against_pin(t, remote, pin, asked)
                plans.append((t, pin, remote, asked))
            need = sum(p.size - _part_done(t, p) for t, p, _, _ in plans)
            dirs = {t.dest.parent for t, *_ in plans}
            for d in dirs:
                try:
                    d.mkdir(parents=True, exist_ok=True)
                    probe = d / f".spark-setup-write-test.{os.getpid()}"
                    probe.touch()
                    probe.unlink()
                except OSError as exc:
                    raise UserError(f"cannot write model files to {d}: {exc.strerror}",
                                    "choose a writable --models-dir (or fix its permissions)") from None
                free = shutil.disk_usage(d).free
                margin = min(GiB, need // 50)
                if free < need + margin:
                    raise UserError(f"not enough disk at {d}: {human(free)} free, {human(need + margin)} needed "
                                    f"({human(need)} still to fetch + {human(margin)} margin)",
                                    "free some space or choose --models-dir on a bigger disk; partial downloads "
                                    "are kept and resume")

            # 4. Transfer, verify, rename.
            for t, pin, remote, asked in plans:
                with FileLock(t):
                    if is_verified(t.dest, pin, load_verified(state)) and not verify:  # another run finished it
                        results[t.key] = _file_result(t, pin, None, "verified")
                        continue

                    def reresolve(t=t, pin=pin, asked=asked) -> Remote:
                        r = head(t.repo, t.file, pin.commit, tok)
                        check_remote_against_pin(t, r, pin, asked)
                        return r

                    fetch = Fetch(t, pin, remote, connections, tok, reporter, stop, reresolve)
                    sha = fetch.run()
                    good = (sha == pin.sha256) if pin.sha256 else (fetch.git_digest == pin.git_oid)
                    if not good:
                        os.replace(t.part, t.corrupt)
                        t.sidecar.unlink(missing_ok=True)
                        reporter.finish(t.file, "CHECKSUM MISMATCH")
                        raise UserError(
                            f"{t.file} arrived complete but its SHA-256 is {sha[:16]}…, not the pinned "
                            f"{(pin.sha256 or pin.git_oid or '')[:16]}… (commit {pin.commit[:12]}); refusing it: "
                            f"the bytes are kept in {t.corrupt} for inspection",
                            "re-run to download it again; if it repeats, your mirror/proxy (HF_ENDPOINT) serves "
                            f"bad data; delete {t.corrupt.name} when done")
                    os.replace(t.part, t.dest)
                    _fsync_dir(t.dest.parent)
                    t.sidecar.unlink(missing_ok=True)
                    _record_verified(state, t, pin, sha)
                    reporter.finish(t.file, "verified")
                    results[t.key] = _file_result(t, pin, sha, "downloaded") | {
                        "fetched_bytes": fetch.received, "transfer_s": round(fetch.t_last_byte - fetch.t_start, 3),
                        "verify_tail_s": round(max(0.0, fetch.t_hashed - fetch.t_last_byte), 3)}
    finally:
        reporter.close()
    return DownloadResult(files=[results[t.key] for t in targets], skipped=False, notes=notes)


def _part_done(t: Target, pin: Pin | None = None) -> int:
    """Bytes of a resumable partial (per its sidecar) that match this pin; 0 when there is none."""
    try:
        sc = json.loads(t.sidecar.read_text(encoding="utf-8"))
        if pin is not None and (sc.get("commit") != pin.commit or sc.get("size") != pin.size):
            return 0
        return sum(int(b) - int(a) for a, b in sc.get("completed", []))
    except (OSError, ValueError, TypeError):
        return 0


def set_current(models_dir: Path, dest: Path, name: str = "current.gguf") -> Path:
    """Point models/current.gguf at `dest` (relative link, replaced atomically)."""
    link = Path(models_dir) / name
    target = os.path.relpath(dest, link.parent)
    tmp = link.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def variant_targets(settings: Settings, variant: str, with_mtp: bool) -> list[Target]:
    return [Target(v.repo, v.file, dest_for(settings.models_dir, v.repo, v.file), v.name)
            for v in catalog.files_for(variant, with_mtp)]


def download_variant(settings: Settings, variant: str = catalog.DEFAULT_VARIANT, with_mtp: bool = False,
                     connections: int = DEFAULT_CONNECTIONS, verify: bool = False, offline: bool = False,
                     revision: str | None = None, token: str | None = None, progress: bool | Reporter = True,
                     pins_file: Path | None = None, repin: bool = False) -> DownloadResult:
    """Provision a catalog variant (and its MTP draft): verified files in the models dir, current.gguf -> base."""
    targets = variant_targets(settings, variant, with_mtp)
    result = fetch_targets(settings, targets, connections=connections, verify=verify, offline=offline,
                           revision=revision, token=token, progress=progress, pins_file=pins_file, repin=repin)
    link = Path(settings.models_dir) / "current.gguf"
    base = targets[0].dest
    if not (link.is_symlink() and os.path.realpath(link) == os.path.realpath(base)):
        set_current(settings.models_dir, base)
    result.current = str(link)
    return result


def download_file(settings: Settings, repo: str, file: str, revision: str | None = None, **kw: Any) -> DownloadResult:
    """Any file of any repo, with the same guarantees (pinned, resumable, verified against the hub's checksum)."""
    if repo.count("/") != 1 or not all(repo.split("/")) or " " in repo:
        raise UsageError(f"--repo must look like OWNER/NAME, got {repo!r}", "e.g. --repo antirez/deepseek-v4-gguf")
    if not file or file.startswith("/") or ".." in Path(file).parts:
        raise UsageError(f"--file must be a path inside the repo, got {file!r}", "e.g. --file model.gguf")
    t = Target(repo, file, dest_for(settings.models_dir, repo, file), Path(file).name)
    return fetch_targets(settings, [t], revision=revision, **kw)


# ---------------------------------------------------------------- what is on disk (for `spark-setup models`)

def local_status(settings: Settings, pins_file: Path | None = None) -> list[dict[str, Any]]:
    store = PinStore(settings.state_dir, pins_file)
    record = load_verified(settings.state_dir)
    link = Path(settings.models_dir) / "current.gguf"
    current = os.path.realpath(link) if link.is_symlink() else None
    out = []
    for v in catalog.VARIANTS.values():
        t = Target(v.repo, v.file, dest_for(settings.models_dir, v.repo, v.file), v.name)
        pin = store.get(v.repo, v.file)
        if pin is not None and is_verified(t.dest, pin, record):
            state = "verified"
        elif t.dest.exists():
            state = "present (not verified)"
        elif t.sidecar.exists():
            total = pin.size if pin else v.approx_bytes
            state = f"partial {100 * _part_done(t) / max(1, total):.0f}%"
        else:
            state = "missing"
        out.append({**v.as_dict(), "path": str(t.dest), "state": state,
                    "current": current is not None and current == os.path.realpath(t.dest),
                    "pin": pin.as_dict() if pin else None})
    return out
