"""A small fake Hugging Face hub on 127.0.0.1 (platform-facts §2), real HTTP, with a separate "CDN" port.

The real huggingface_hub client accepts it (HEAD /resolve/, /api/models/.../revision, tree, paths-info).
Faults can be injected per hub: drop the connection after N body bytes, stall, serve wrong bytes at the right
size, replace a file (new commit, or in place), answer 500/401/404, ignore Range, throttle each connection.

    with FakeHub() as hub:
        commit = hub.add_file("owner/repo", "model.gguf", data)
        os.environ["HF_ENDPOINT"] = hub.url

Run it standalone (for the CLI or a benchmark): python tests/fakehub.py --file PATH --repo o/r [--rate BYTES/S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256_of(src: bytes | Path) -> str:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest()
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while buf := f.read(16 << 20):
            h.update(buf)
    return h.hexdigest()


class Blob:
    """File content held in memory (bytes) or on disk (Path, for big benchmark files)."""

    def __init__(self, src: bytes | Path, lfs: bool, sha256: str | None = None):
        self.src = src
        self.size = len(src) if isinstance(src, bytes) else os.path.getsize(src)
        self.lfs = lfs
        self.sha256 = sha256 or _sha256_of(src)
        if lfs:
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                       f"size {self.size}\n").encode()
            self.pointer_size = len(pointer)
            self.oid = git_blob_oid(pointer)
        else:
            self.pointer_size = None
            self.oid = git_blob_oid(src if isinstance(src, bytes) else Path(src).read_bytes())

    def read(self, start: int, length: int) -> bytes:
        if isinstance(self.src, bytes):
            return self.src[start:start + length]
        with open(self.src, "rb") as f:
            f.seek(start)
            return f.read(length)

    def entry(self, path: str) -> dict:
        e = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return e


class FakeHub:
    def __init__(self, cdn: bool = True, rate: float | None = None, token: str = "hf_fake_token_for_tests"):
        self.repos: dict[str, dict] = {}  # repo -> {"commits": {commit: {path: Blob}}, "order": [...], "gated"}
        self.use_cdn = cdn
        self.token = token
        self._counter = 0
        self.lock = threading.Lock()
        # fault injection (tests flip these)
        self.rate = rate  # bytes/s per connection for file bodies
        self.drop_after: int | None = None  # close a body response after this many bytes...
        self.drop_times: int | None = None  # ...this many times (None: every time)
        self.stall: tuple[int, float] | None = None  # (after bytes, seconds) once per response
        self.stall_times: int | None = None
        self.corrupt: set[tuple[str, str]] = set()  # serve these with one byte flipped (same size)
        self.fail_status: list[int] = []  # next body GETs answer these statuses, one each
        self.ignore_range = False
        self.cdn_ttl = 3600.0
        # observations
        self.sent: dict[tuple[str, str], int] = {}
        self.requests: list[dict] = []
        self.auth_on_cdn: list[str] = []
        self.hub_server = self._server(_HubHandler)
        self.cdn_server = self._server(_CdnHandler)
        self.threads: list[threading.Thread] = []

    # ---- setup
    def _server(self, handler):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        srv.hub = self  # type: ignore[attr-defined]
        return srv

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub_server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn_server.server_address[1]}"

    def start(self) -> "FakeHub":
        for srv in (self.hub_server, self.cdn_server):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        for srv in (self.hub_server, self.cdn_server):
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_file(self, repo: str, path: str, data: bytes | Path, lfs: bool = True, gated: bool = False,
                 sha256: str | None = None) -> str:
        """Commit `data` as `path` on main (a new commit, like an upload); returns the 40-hex commit."""
        blob = Blob(data, lfs, sha256)
        with self.lock:
            r = self.repos.setdefault(repo, {"commits": {}, "order": [], "gated": False})
            r["gated"] = r["gated"] or gated
            files = dict(r["commits"][r["order"][-1]]) if r["order"] else {}
            files[path] = blob
            self._counter += 1
            commit = hashlib.sha1(f"{repo}#{self._counter}#{time.time_ns()}".encode()).hexdigest()
            r["commits"][commit] = files
            r["order"].append(commit)
        return commit

    def replace_in_place(self, repo: str, path: str, data: bytes) -> None:
        """History rewritten: every commit that had `path` now serves `data` (what a pin must catch)."""
        blob = Blob(data, True)
        with self.lock:
            for files in self.repos[repo]["commits"].values():
                if path in files:
                    files[path] = blob

    def head_commit(self, repo: str) -> str:
        return self.repos[repo]["order"][-1]

    def bytes_sent(self, repo: str, path: str) -> int:
        return self.sent.get((repo, path), 0)

    # ---- lookups used by the handlers
    def lookup(self, repo: str, rev: str):
        r = self.repos.get(repo)
        if r is None:
            return None, None, "RepoNotFound"
        commit = r["order"][-1] if rev == "main" else rev
        if commit not in r["commits"]:
            return r, None, "RevisionNotFound"
        return r, commit, None

    def authorized(self, repo: dict, headers) -> bool:
        return not repo["gated"] or headers.get("Authorization") == f"Bearer {self.token}"

    def sign(self, repo: str, path: str, commit: str) -> str:
        exp = time.time() + self.cdn_ttl
        return f"{self.cdn_url}/blobs/{quote(repo, safe='')}/{commit}/{quote(path)}?expires={exp:.3f}&sig=x"


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json"):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, msg: str) -> None:
        headers = {"X-Error-Code": code} if code else {}
        self._reply(status, json.dumps({"error": msg}).encode(), headers | {"X-Error-Message": msg})

    def _file_headers(self, commit: str, blob: Blob) -> dict:
        h = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            h["X-Linked-Etag"] = f'"{blob.sha256}"'
            h["X-Linked-Size"] = str(blob.size)
        return h

    def _send_body(self, repo: str, path: str, blob: Blob, extra: dict) -> None:
        hub = self.hub
        with hub.lock:
            status_fault = hub.fail_status.pop(0) if hub.fail_status else None
        hub.requests.append({"method": self.command, "path": path, "range": self.headers.get("Range"),
                             "port": self.server.server_address[1], "fault": status_fault})
        if status_fault is not None:
            self._error(status_fault, None, f"injected HTTP {status_fault}")
            return
        start, end, status = 0, blob.size - 1, 200
        rng = self.headers.get("Range")
        if rng and not hub.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                self._error(416, None, "bad range")
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else blob.size - 1, blob.size - 1)
            if start >= blob.size or start > end:
                self._reply(416, b"", {"Content-Range": f"bytes */{blob.size}"})
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub.lock:
            drop = hub.drop_after if (hub.drop_after is not None and hub.drop_times != 0) else None
            if drop is not None and hub.drop_times is not None:
                hub.drop_times -= 1
            stall = hub.stall if (hub.stall is not None and hub.stall_times != 0) else None
            if stall is not None and hub.stall_times is not None:
                hub.stall_times -= 1
        corrupt_at = blob.size // 2 if (repo, path) in hub.corrupt else None
        sent, t0, block = 0, time.monotonic(), 256 * 1024
        pos, fh = start, None
        try:
            while pos <= end:
                n = min(block, end + 1 - pos)
                if drop is not None:
                    n = min(n, drop - sent)
                    if n <= 0:
                        break
                if stall is not None and sent >= stall[0]:
                    time.sleep(stall[1])
                    stall = None
                if isinstance(blob.src, Path) and corrupt_at is None:  # big files: zero-copy from the page cache
                    self.wfile.flush()
                    if fh is None:
                        fh = open(blob.src, "rb")
                    n = self.connection.sendfile(fh, pos, n) or 0
                    if n == 0:
                        break
                else:
                    buf = blob.read(pos, n)
                    if corrupt_at is not None and pos <= corrupt_at < pos + n:
                        b = bytearray(buf)
                        b[corrupt_at - pos] ^= 0xFF
                        buf = bytes(b)
                    self.wfile.write(buf)
                pos += n
                sent += n
                with hub.lock:
                    hub.sent[(repo, path)] = hub.sent.get((repo, path), 0) + n
                if hub.rate:
                    ahead = sent / hub.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        finally:
            if fh is not None:
                fh.close()
        if pos <= end:  # injected drop: cut the connection mid-body
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HubHandler(_Base):
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree|paths-info)/([^/]+)(?:/.*)?", path)
        if path.startswith("/api/agent-harnesses"):
            self._error(404, None, "not here")
        elif m and self.command in ("GET", "POST"):
            self._api(m.group(1), m.group(2), m.group(3))
        else:
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m or self.command not in ("HEAD", "GET"):
                self._error(404, None, "no such route")
                return
            self._resolve(m.group(1), m.group(2), m.group(3))

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _api(self, repo_id: str, kind: str, rev: str) -> None:
        body = self._body()
        repo, commit, err = self.hub.lookup(repo_id, rev)
        if err:
            self._error(404 if err == "RevisionNotFound" else 401, err, f"{err}: {repo_id}@{rev}")
            return
        if not self.hub.authorized(repo, self.headers):
            self._error(401, "GatedRepo", f"{repo_id} is gated")
            return
        files = repo["commits"][commit]
        if kind == "revision":
            data = {"id": repo_id, "sha": commit,
                    "siblings": [({"rfilename": p, "size": b.size, "blobId": b.oid} |
                                  ({"lfs": {"size": b.size, "sha256": b.sha256, "pointerSize": b.pointer_size}}
                                   if b.lfs else {})) for p, b in sorted(files.items())]}
        elif kind == "tree":
            data = [b.entry(p) for p, b in sorted(files.items())]
        else:
            form = parse_qs(body.decode())
            wanted = form.get("paths", [])
            data = [files[p].entry(p) for p in wanted if p in files]
        self._reply(200, json.dumps(data).encode())

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo, commit, err = self.hub.lookup(repo_id, rev)
        if err:
            self._error(404 if err == "RevisionNotFound" else 401, err, f"{err}: {repo_id}@{rev}")
            return
        if not self.hub.authorized(repo, self.headers):
            self._error(401, "GatedRepo", f"{repo_id} is gated: send a token")
            return
        blob = repo["commits"][commit].get(path)
        if blob is None:
            self._error(404, "EntryNotFound", f"{path} not in {repo_id}@{rev}")
            return
        headers = self._file_headers(commit, blob)
        if blob.lfs and self.hub.use_cdn:
            headers["Location"] = self.hub.sign(repo_id, path, commit)
            self._reply(302, b"", headers, ctype="text/plain")
            return
        self._send_body(repo_id, path, blob, headers)


class _CdnHandler(_Base):
    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        if self.headers.get("Authorization"):
            self.hub.auth_on_cdn.append(self.headers["Authorization"])
        m = re.fullmatch(r"/blobs/([^/]+)/([0-9a-f]{40})/(.+)", url.path)
        q = parse_qs(url.query)
        if not m:
            self._error(404, None, "no such blob")
            return
        if float(q.get("expires", ["0"])[0]) < time.time():
            self._error(403, None, "signature expired")
            return
        repo_id, commit, path = unquote(m.group(1)), m.group(2), unquote(m.group(3))
        repo, commit, err = self.hub.lookup(repo_id, commit)
        blob = repo["commits"][commit].get(path) if not err else None
        if blob is None:
            self._error(404, None, "no such blob")
            return
        self._send_body(repo_id, path, blob, {"ETag": f'"{blob.sha256}"'})


def main() -> None:
    ap = argparse.ArgumentParser(description="serve files as a fake Hugging Face hub on 127.0.0.1")
    ap.add_argument("--repo", default="owner/repo")
    ap.add_argument("--file", action="append", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=None, help="bytes/s per connection")
    ap.add_argument("--no-cdn", action="store_true")
    ap.add_argument("--url-file", type=Path, help="write the hub URL here once serving")
    ap.add_argument("--sha256", action="append", default=[], help="known SHA-256 of each --file (skips hashing)")
    args = ap.parse_args()
    hub = FakeHub(cdn=not args.no_cdn, rate=args.rate).start()
    for i, f in enumerate(args.file):
        hub.add_file(args.repo, f.name, f, sha256=args.sha256[i] if i < len(args.sha256) else None)
    if args.url_file:
        args.url_file.write_text(hub.url)
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
