"""The smoke test: ask "What is the capital of France? Answer in one word." and require /paris/i.

It always goes through the same path as a real client: an HTTP request to an OpenAI-compatible server. With a
URL it asks that server; with a model file (or the demo model) it starts our own server as a subprocess on a free
loopback port, waits until /health says ready, asks, and stops it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import httpx

from .errors import UserError
from .settings import Settings, load_settings

QUESTION = "What is the capital of France? Answer in one word."
EXPECTED = re.compile(r"paris", re.IGNORECASE)


@dataclass
class SmokeResult:
    passed: bool
    answer: str
    ttft_s: float | None
    tokens_per_s: float | None
    url: str = ""
    model: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def ask(url: str, api_key: str | None = None, timeout_s: float = 600.0, max_tokens: int = 64) -> SmokeResult:
    """One streamed, non-thinking, greedy chat request; measures time to first token and decode speed."""
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = _headers(api_key)
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
            r = client.get(f"{base}/models", headers=headers)
            _raise_for(r, url)
            models = r.json().get("data") or [{}]
            model = models[0].get("id", "")
            body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens,
                    "thinking": {"type": "disabled"}, "think": False}
            t0 = time.monotonic()
            t_first = t_last = None
            content, usage, finish = [], None, None
            with client.stream("POST", f"{base}/chat/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    resp.read()
                    _raise_for(resp, url)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise UserError(f"the server at {url} failed: {chunk['error'].get('message')}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                        if piece:
                            t_last = time.monotonic()
                            t_first = t_first or t_last
                            content.append(delta.get("content") or "")
                        finish = choice.get("finish_reason") or finish
            t_end = time.monotonic()
    except httpx.HTTPError as exc:
        raise UserError(f"cannot talk to the server at {url}: {exc}", "check the URL and that the server runs "
                        "(spark-setup status)")
    answer = "".join(content).strip()
    n = (usage or {}).get("completion_tokens")
    # decode steps after the first token: each later token, plus the end-of-sentence step when it stopped
    steps = (n - 1 + (1 if finish == "stop" else 0)) if n else 0
    tps = steps / (t_end - t_first) if t_first is not None and steps > 0 and t_end > t_first else None
    return SmokeResult(bool(EXPECTED.search(answer)), answer, (t_first - t0) if t_first else None, tps, url, model,
                       n, finish)


def _raise_for(r: httpx.Response, url: str) -> None:
    if r.status_code == 200:
        return
    try:
        msg = r.json()["error"]["message"]
    except Exception:
        msg = r.text[:200]
    hint = "pass the server's key: --api-key KEY (or SPARK_SETUP_API_KEY)" if r.status_code == 401 else \
        "wait until `curl URL/health` answers 200" if r.status_code == 503 else None
    raise UserError(f"the server at {url} answered {r.status_code}: {msg}", hint)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float,
               progress: Callable[[dict], None] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            err, fix = _cli_error(log)
            if err:  # the server's own one-line error and fix
                raise UserError(err, fix)
            raise UserError(f"the server exited with code {proc.returncode} before it was ready: {_tail(log)}")
        try:
            r = httpx.get(url.rstrip("/") + "/health", timeout=2.0)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200:
                return
            if progress:
                progress(body)
            if body.get("status") == "error":
                raise UserError(f"the server could not load the model: {body.get('error')}")
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the server was not ready after {timeout_s:.0f} s: {_tail(log)}",
                            "a slow disk needs longer; try again, or load it once with spark-setup serve --foreground")
        time.sleep(0.2)


def _cli_error(log: Path | None) -> tuple[str | None, str | None]:
    if not log or not log.exists():
        return None, None
    err = fix = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("error: "):
            err, fix = line[len("error: "):], None
        elif line.startswith("fix: ") and err:
            fix = line[len("fix: "):]
    return err, fix


def _tail(log: Path | None, n: int = 3) -> str:
    if not log or not log.exists():
        return "(no log)"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(empty log)"


def run_smoke(url: str | None = None, model: str | Path | None = None, demo: bool = False,
              settings: Settings | None = None, api_key: str | None = None, ctx: int = 4096,
              load_timeout_s: float = 1800.0, progress: Callable[[dict], None] | None = None,
              backend: str = "auto") -> SmokeResult:
    """Ask the capital of France. url: an existing server. model / demo: start our server on a free port."""
    if sum(bool(x) for x in (url, model, demo)) > 1:
        raise UserError("choose one of a URL, a model file or the demo model", exit_code=2)
    settings = settings or load_settings()
    api_key = api_key if api_key is not None else os.environ.get("SPARK_SETUP_API_KEY")
    if url:
        return ask(url, api_key)
    if not model and not demo:
        from .service import server_url  # the installed server, if any, is the default target

        return ask(server_url(settings), api_key)
    port = free_port()
    args = [sys.executable, "-m", "spark_setup", "serve", "--foreground", "--host", "127.0.0.1", "--port", str(port),
            "--ctx", str(ctx), "--backend", backend]
    args += ["--demo"] if demo else ["--model", str(Path(model).expanduser().absolute())]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="spark-setup-smoke-") as tmp:
        # this throwaway server keeps its logs in tmp, away from the real server's log
        env.update({"SPARK_SETUP_PREFIX": str(settings.prefix), "SPARK_SETUP_MODELS_DIR": str(settings.models_dir),
                    "SPARK_SETUP_STATE_DIR": tmp})
        env.pop("NOTIFY_SOCKET", None)
        env.pop("SPARK_SETUP_API_KEY", None)
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            server = f"http://127.0.0.1:{port}"
            wait_ready(server, proc, load_timeout_s, progress, log)
            return ask(server, None)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
