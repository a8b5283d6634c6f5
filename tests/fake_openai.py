"""A scripted OpenAI-compatible server on 127.0.0.1 for the bench tests.

It "prefills" at a known rate (prompt tokens / prefill_tps, after a fixed base latency), then streams tokens at a
known rate, `chunk_tokens` tokens per SSE chunk, and ends with a usage chunk. Prompt tokens are counted with the
tokenizer it is given (+ a fixed chat-template overhead). Every request payload is recorded.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional


@dataclass
class Script:
    prefill_tps: float = 4000.0
    tg_tps: float = 100.0
    base_latency: float = 0.02
    chunk_tokens: int = 1
    overhead_tokens: int = 5
    honour_ignore_eos: bool = True
    eos_after: Optional[int] = None  # natural end of the answer (tokens), used when ignore_eos is not honoured
    send_usage: bool = True
    model: str = "fake-ds4"


@dataclass
class FakeOpenAI:
    count_tokens: Callable[[str], int]
    script: Script = field(default_factory=Script)
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    body = json.dumps({"object": "list", "data": [{"id": fake.script.model, "object": "model"}]})
                    self._send(200, body.encode(), "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(n))
                t0 = time.perf_counter()
                fake.requests.append(payload)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}', "application/json")
                    return
                fake._stream(self, payload, t0)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def prompt_tokens(self, payload: dict) -> int:
        return sum(self.count_tokens(m.get("content") or "") for m in payload["messages"]) + self.script.overhead_tokens

    def _stream(self, h: BaseHTTPRequestHandler, payload: dict, t0: float) -> None:
        sc = self.script
        n_prompt = self.prompt_tokens(payload)
        max_tokens = int(payload.get("max_tokens") or 16)
        n = max_tokens
        if sc.eos_after is not None and not (sc.honour_ignore_eos and payload.get("ignore_eos")):
            n = min(n, sc.eos_after)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()

        def wait_until(t: float) -> None:
            d = t - time.perf_counter()
            if d > 0:
                time.sleep(d)

        def send(obj: Any) -> None:
            h.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            h.wfile.flush()

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": sc.model}
        t_first = t0 + sc.base_latency + n_prompt / sc.prefill_tps
        wait_until(t_first)
        send({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        i = 0
        while i < n:
            k = min(sc.chunk_tokens, n - i)
            wait_until(t_first + (i + k - 1) / sc.tg_tps)  # token j is ready at t_first + j / tg_tps
            send({**base, "choices": [{"index": 0, "delta": {"content": " w" * k}, "finish_reason": None}]})
            i += k
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length" if n == max_tokens else "stop"}]})
        if sc.send_usage and (payload.get("stream_options") or {}).get("include_usage"):
            send({**base, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                                  "total_tokens": n_prompt + n}})
        send(b"[DONE]")

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
