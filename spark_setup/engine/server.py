"""The OpenAI-compatible HTTP server (platform-facts.md §6) over a pool of engine sessions (one by default).

Shape:
- Starlette app + uvicorn; SSE through sse-starlette.
- The model loads in a background thread; GET /health answers 503 with progress until the model is loaded AND
  has generated one token, then 200. Under systemd the same progress goes to $NOTIFY_SOCKET (STATUS=,
  EXTEND_TIMEOUT_USEC= while loading, READY=1 when ready, STOPPING=1 on shutdown).
- One engine worker thread owns the sessions. Requests wait in a bounded FIFO (429 + Retry-After beyond it). A
  request whose client went away is cancelled before its next token. The worker keeps each session's tokens and
  reuses their longest common prefix with the next prompt (Session.truncate) instead of prefilling again; with
  several sessions (`--sessions`), a prompt goes to the one it shares most with, unless that would throw away more
  than half of what it holds: then to the least recently used one (pick_slot).
- Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}; /v1/messages uses Anthropic's.
- /v1/chat/completions and /v1/completions here; Anthropic's /v1/messages and OpenAI's /v1/responses (apis.py)
  share the chat format, the worker and the non-streamed collection.
- Tools: the prompt carries the model's tools block (chat.py); the worker passes the answer text through a
  ToolCallScanner (toolcalls.py), which keeps the DSML call block out of the text, ends the turn when the block
  closes and hands the calls over as a ("tool_calls", calls) event before "done" (finish "tool_calls").

The engine is anything with the `Engine` shape below; `load_engine` builds the real one (runtime.Model + the
tokenizer from the same GGUF).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import apis, chat
from .sampling import DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampler, SamplingParams, StopMatcher
from .tokenizer import DSML, Tokenizer
from .toolcalls import ToolCallScanner

log = logging.getLogger("spark_setup.server")

DEFAULT_CTX = 32768
DEFAULT_QUEUE = 8
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---------------------------------------------------------------------------------------------------------------
# the engine seam


class Session(Protocol):
    pos: int
    max_ctx: int

    def eval(self, tokens: list[int]) -> Any: ...  # logits of the last position, shape [n_vocab]
    def truncate(self, n: int) -> None: ...


@dataclass
class Engine:
    tokenizer: Tokenizer
    session: Session
    model_id: str
    max_ctx: int
    close: Callable[[], None] = lambda: None  # frees every session and the model
    info: dict = field(default_factory=dict)
    # one more session of max_ctx tokens on the same weights (the server's pool); None: this engine has only one
    new_session: Callable[[], Session] | None = None


def load_engine(path: Path, ctx: int, backend: str = "cpu", progress: Callable[[str], None] = lambda s: None) -> Engine:
    """The real engine: runtime.Model over the GGUF, one session of `ctx` tokens, the GGUF's tokenizer."""
    from . import runtime

    progress("reading the tokenizer")
    tok = Tokenizer.from_gguf(path)
    missing = tok.missing_specials()
    if missing:
        raise EngineLoadError(f"{path} lacks the DS4 special tokens {missing}")
    progress(f"loading weights on {backend}")
    model = runtime.Model(str(path), backend=backend)
    try:
        n_vocab = int(getattr(model, "desc", {}).get("n_vocab", tok.n_vocab))
        if n_vocab != tok.n_vocab:
            raise EngineLoadError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model {n_vocab}")
        progress(f"allocating a {ctx}-token session")
        sessions = [model.new_session(ctx)]
    except BaseException:
        model.close()
        raise

    def more() -> Session:
        sessions.append(model.new_session(ctx))
        return sessions[-1]

    def close() -> None:
        for one in sessions:
            one.close()
        model.close()

    desc = dict(getattr(model, "desc", {}) or {})
    return Engine(tok, sessions[0], Path(path).stem, ctx, close, {"backend": backend, **desc}, more)


class EngineLoadError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint  # the fix the one-line error suggests (serve shows it)


# ---------------------------------------------------------------------------------------------------------------
# systemd notify (no library: one datagram per message)


def sd_notify(message: str, env: dict | None = None) -> bool:
    """Send `message` to $NOTIFY_SOCKET (AF_UNIX datagram; '@' = abstract namespace). False when not under
    systemd or the socket is gone."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False


# ---------------------------------------------------------------------------------------------------------------
# jobs and the worker


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self, anthropic: bool = False) -> JSONResponse:
        body = apis.anthropic_error(self.status, self.message) if anthropic else \
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    thinking: bool  # the prompt opened a <think> block: text is reasoning until </think>
    loop: asyncio.AbstractEventLoop
    tools: bool = False  # the prompt offered tools: a DSML tool-call block in the answer becomes calls
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Slot:
    """One engine session of the pool and the tokens its state holds."""
    session: Session
    tokens: list[int] = field(default_factory=list)
    used: float = 0.0  # time.monotonic() of its last job


def pick_slot(slots: list[Slot], prompt: list[int]) -> Slot:
    """The session for a prompt: of those whose cached tokens it shares at least half of (so little cached work is
    thrown away), the one it shares most with; else the least recently used. With one session: that one."""
    shares = [(common_prefix(sl.tokens, prompt), sl) for sl in slots]
    good = [(n, sl.used, i) for i, (n, sl) in enumerate(shares) if n > 0 and 2 * n >= len(sl.tokens)]
    if good:
        return slots[max(good)[2]]
    return min(slots, key=lambda sl: sl.used)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Worker:
    """The one thread that touches the engine. Jobs run in arrival order."""

    def __init__(self, max_queue: int = DEFAULT_QUEUE):
        self.max_queue = max_queue
        self.engine: Engine | None = None
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._current: Job | None = None
        self._stop = False
        self.slots: list[Slot] = []
        self.stats = {"requests": 0, "reused_tokens": 0, "prefilled_tokens": 0, "generated_tokens": 0}
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    def start(self, engine: Engine, sessions: list[Session] | None = None) -> None:
        self.engine = engine
        self.slots = [Slot(one) for one in (sessions or [engine.session])]
        self.stats["sessions"] = len(self.slots)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many are ahead of it. Raises APIError(429) when the queue is full."""
        with self._cv:
            if self._stop:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self._jobs) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._jobs)} requests already waiting",
                               "rate_limit_exceeded", code="queue_full",
                               headers={"Retry-After": str(max(1, len(self._jobs)))})
            ahead = len(self._jobs) + (1 if self._busy else 0)
            self._jobs.append(job)
            self._cv.notify()
            return ahead

    def stop(self, timeout: float = 30.0) -> bool:
        """Cancel what waits and what runs; True once the thread has finished (the engine is free to close)."""
        with self._cv:
            self._stop = True
            for job in self._jobs:
                job.cancelled.set()
                job.post("error", 503, "the server is shutting down")
            self._jobs.clear()
            if self._current is not None:
                self._current.cancelled.set()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop and not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
                self._current = job
            slot = None
            try:
                if job.cancelled.is_set():
                    job.post("done", "cancelled", None)
                else:
                    slot = pick_slot(self.slots, job.prompt)
                    slot.used = time.monotonic()
                    self._generate(job, slot)
            except Exception as exc:  # an engine failure fails this request, not the server
                log.exception("generation failed")
                if slot is not None:
                    slot.tokens = []  # the session state is unknown now: re-prefill next time
                    try:
                        slot.session.truncate(0)
                    except Exception:
                        pass
                job.post("error", 500, f"generation failed: {exc}")
            finally:
                with self._cv:
                    self._busy = False
                    self._current = None

    def _prefill(self, slot: Slot, prompt: list[int]):
        s = slot.session
        keep = common_prefix(slot.tokens, prompt)
        keep = min(keep, len(prompt) - 1, s.pos)  # at least one token must run to get logits
        s.truncate(keep)
        slot.tokens = slot.tokens[:keep]
        logits = s.eval(prompt[keep:])
        slot.tokens += prompt[keep:]
        self.stats["reused_tokens"] += keep
        self.stats["prefilled_tokens"] += len(prompt) - keep
        return logits, keep

    def _generate(self, job: Job, slot: Slot) -> None:
        eng = self.engine
        tok, s = eng.tokenizer, slot.session
        self.stats["requests"] += 1
        t0 = time.monotonic()
        logits, reused = self._prefill(slot, job.prompt)
        t_prefill = time.monotonic() - t0
        sampler = Sampler(job.params)
        decoder = tok.stream_decoder()
        stopper = StopMatcher(job.params.stop)
        scanner = ToolCallScanner() if job.tools else None
        dsml_id = tok.token_id(DSML) if job.tools else None
        in_reasoning = job.thinking
        limit = job.params.max_tokens
        n_gen = n_reasoning = 0
        finish = "length"
        context_full = False
        t_first = None
        while True:
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            token = sampler(logits)
            if token == tok.eos_id:
                finish = "stop"
                break
            n_gen += 1
            n_reasoning += in_reasoning  # the closing </think> counts as reasoning
            self.stats["generated_tokens"] += 1
            if t_first is None:
                t_first = time.monotonic() - t0
            if token == tok.end_think_id and in_reasoning:
                in_reasoning = False
                tail = decoder.flush()
                if tail:
                    job.post("delta", "reasoning", tail)
            elif not tok.is_special(token) or token == dsml_id:  # other specials are counted, never shown
                text = decoder.push(token)
                if text and in_reasoning:
                    job.post("delta", "reasoning", text)
                elif text:
                    if scanner is not None:
                        text = scanner.push(text)
                    text, stopped = stopper.push(text)
                    if text:
                        job.post("delta", "content", text)
                    if stopped:
                        finish = "stop_string"
                        break
                    if scanner is not None and scanner.closed:  # the calls are complete: the turn is over
                        finish = "tool_calls"
                        break
            if limit is not None and n_gen >= limit:
                break
            if s.pos >= s.max_ctx:
                context_full = True
                break
            logits = s.eval([token])
            slot.tokens.append(token)
        if finish not in ("cancelled", "stop_string"):
            rest = decoder.flush()
            if in_reasoning:
                if rest:
                    job.post("delta", "reasoning", rest)
            else:
                calls = []
                if scanner is not None:
                    shown, (tail, calls) = scanner.push(rest), scanner.finish()
                    rest = shown + tail
                text, stopped = stopper.push(rest)
                if not stopped:
                    text += stopper.flush()
                else:
                    finish = "stop"
                if text:
                    job.post("delta", "content", text)
                # calls the model finished (block closed, or end of turn); a block cut by max_tokens is dropped
                if calls and (finish in ("tool_calls", "stop") or (scanner is not None and scanner.closed)):
                    job.post("tool_calls", calls)
                    finish = "tool_calls"
        if finish == "stop_string":
            finish = "stop"
        elapsed = time.monotonic() - t0
        timings = {"prompt_tokens": len(job.prompt), "reused_tokens": reused, "prefill_s": round(t_prefill, 4),
                   "ttft_s": round(t_first, 4) if t_first is not None else None,
                   "decode_tokens_per_s": round((n_gen - 1) / (elapsed - t_first), 2)
                   if t_first is not None and n_gen > 1 and elapsed > t_first else None,
                   "queued_s": round(t0 - job.enqueued, 4)}
        if timings["decode_tokens_per_s"] is not None:  # shown by `spark-setup status` through /health
            self.stats["last_decode_tokens_per_s"] = timings["decode_tokens_per_s"]
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": n_gen,
                 "total_tokens": len(job.prompt) + n_gen,
                 "prompt_tokens_details": {"cached_tokens": reused},  # OpenAI's names for the same counts
                 "completion_tokens_details": {"reasoning_tokens": n_reasoning}}
        log.info("generation finish=%s prompt=%d reused=%d completion=%d ttft=%s tok/s=%s queued=%.3fs", finish,
                 len(job.prompt), reused, n_gen, timings["ttft_s"], timings["decode_tokens_per_s"],
                 timings["queued_s"])
        # for the Anthropic and Responses surfaces (apis.py): which stop string ended the text, how much of the
        # completion was thinking, and whether the context (not max_tokens) cut it
        job.post("done", finish, {"usage": usage, "timings": timings, "stop_sequence": stopper.matched,
                                  "reasoning_tokens": n_reasoning, "context_full": context_full})


# ---------------------------------------------------------------------------------------------------------------
# request parsing


def _get(body: dict, key: str, kind, default=None, *, check=None, name=None):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        value = None  # bool is an int in Python; never accept it for numbers
    if not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise APIError(400, f"'{name or key}' must be {names}", param=key, code="invalid_type")
    if check is not None:
        problem = check(value)
        if problem:
            raise APIError(400, f"'{name or key}' {problem}", param=key, code="invalid_value")
    return value


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float]:
    raw = _get(body, "logit_bias", dict, {})
    out = {}
    for k, v in (raw or {}).items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            tid = -1
        if not 0 <= tid < n_vocab:
            raise APIError(400, f"'logit_bias' key {k!r} is not a token id in [0, {n_vocab})", param="logit_bias",
                           code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise APIError(400, "'logit_bias' values must be numbers", param="logit_bias", code="invalid_type")
        out[tid] = float(v)
    return out


def sampling_from(body: dict, default_max_tokens: int | None, n_vocab: int) -> SamplingParams:
    max_tokens = _get(body, "max_completion_tokens", int) or _get(body, "max_tokens", int, default_max_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stop) > 16:
        raise APIError(400, "'stop' accepts at most 16 strings", param="stop", code="invalid_value")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    p = SamplingParams(
        temperature=float(_get(body, "temperature", (int, float), DEFAULT_TEMPERATURE)),
        top_p=float(_get(body, "top_p", (int, float), DEFAULT_TOP_P)),
        top_k=int(_get(body, "top_k", int, 0)),
        min_p=float(_get(body, "min_p", (int, float), DEFAULT_MIN_P)),
        seed=_get(body, "seed", int),
        presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0)),
        frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0)),
        max_tokens=max_tokens,
        stop=[s for s in stop if s],
        logit_bias=_logit_bias(body, n_vocab),
    )
    try:
        p.validate()
    except ValueError as exc:
        raise APIError(400, str(exc), param=str(exc).split()[0], code="invalid_value")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, "max_tokens must be >= 1", param="max_tokens", code="invalid_value")
    return p


def thinking_from(body: dict) -> bool:
    """Thinking is the model's default; `thinking: {type: disabled}` or `think: false` turn it off."""
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise APIError(400, "'think' must be a boolean", param="think", code="invalid_type")
        return think
    thinking = body.get("thinking")
    if thinking is not None:
        # "adaptive": Anthropic's let-the-model-decide; this model decides by thinking
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise APIError(400, "'thinking' must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}",
                           param="thinking", code="invalid_value")
        return thinking["type"] != "disabled"
    extra = body.get("chat_template_kwargs")
    if isinstance(extra, dict) and isinstance(extra.get("thinking"), bool):
        return extra["thinking"]
    return True


def reasoning_from(body: dict, effort: Any) -> tuple[bool, bool]:
    """(thinking, Think-Max) of a request: a reasoning effort of none/minimal turns thinking off, max/xhigh asks for
    the Think-Max prefix (thinking mode only); any other effort (low/medium/high) leaves the defaults."""
    if effort is not None and not isinstance(effort, str):
        raise APIError(400, "the reasoning effort must be a string", param="reasoning_effort", code="invalid_type")
    if effort in ("none", "minimal"):
        return False, False
    thinking = thinking_from(body)
    return thinking, thinking and effort in ("max", "xhigh")


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# ---------------------------------------------------------------------------------------------------------------
# the app


@dataclass
class ServerConfig:
    model_path: Path | None
    ctx: int = DEFAULT_CTX
    backend: str = "cpu"
    api_key: str | None = None
    max_queue: int = DEFAULT_QUEUE
    model_id: str | None = None
    sessions: int = 1  # engine sessions in the pool: each keeps one conversation's state (context memory each)


class ServerState:
    def __init__(self, config: ServerConfig, loader: Callable[..., Engine]):
        self.config = config
        self.loader = loader
        self.status = "loading"
        self.progress = "starting"
        self.percent = 0
        self.load_exc: Exception | None = None
        self.error: str | None = None
        self.started = time.time()
        self.worker = Worker(config.max_queue)
        self.engine: Engine | None = None
        self._notify_stop = threading.Event()
        self.on_fatal: Callable[[], None] | None = None  # called when loading fails (serve() stops the process)

    # rough share of the loading time each phase starts at (the engine has no finer progress to report)
    PHASES = {"reading the tokenizer": 5, "loading weights": 10, "allocating": 85, "generating a first token": 95}

    def set_progress(self, text: str) -> None:
        self.progress = text
        self.percent = next((v for k, v in self.PHASES.items() if text.startswith(k)), self.percent)
        log.info("loading: %s", text)
        sd_notify(f"STATUS=loading: {text}")

    def _extend_timeout(self) -> None:
        while not self._notify_stop.wait(5.0):
            sd_notify(f"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=loading: {self.progress}")

    def load(self) -> None:
        ticker = threading.Thread(target=self._extend_timeout, daemon=True)
        ticker.start()
        try:
            cfg = self.config
            engine = self.loader(cfg.model_path, cfg.ctx, cfg.backend, self.set_progress)
            if cfg.model_id:
                engine.model_id = cfg.model_id
            self.engine = engine
            self.set_progress("generating a first token")
            tok = engine.tokenizer
            engine.session.truncate(0)
            logits = engine.session.eval(tok.encode(chat.render_user("Hi", thinking=False)))
            Sampler(SamplingParams(temperature=0))(logits)
            engine.session.truncate(0)
            sessions = [engine.session]
            if cfg.sessions > 1 and engine.new_session is None:
                raise EngineLoadError("this engine cannot make more than one session")
            for n in range(2, cfg.sessions + 1):
                self.set_progress(f"allocating session {n} of {cfg.sessions} ({cfg.ctx} tokens)")
                try:
                    sessions.append(engine.new_session())
                except Exception as exc:  # most likely memory: the weights took it
                    raise EngineLoadError(f"session {n} of {cfg.sessions} ({cfg.ctx} tokens) could not be "
                                          f"allocated: {exc}", "use fewer --sessions or a smaller --ctx") from exc
            self.worker.start(engine, sessions)
            self.status = "ok"
            self.progress = "ready"
            self.percent = 100
            log.info("ready: model %s, ctx %d, load %.1fs", engine.model_id, engine.max_ctx, time.time() - self.started)
            sd_notify(f"READY=1\nSTATUS=ready: {engine.model_id} (ctx {engine.max_ctx})")
        except Exception as exc:
            self.status = "error"
            self.load_exc = exc
            self.error = str(exc) or type(exc).__name__
            log.error("loading failed: %s", self.error)
            sd_notify(f"STATUS=failed: {self.error}")
            if self.on_fatal is not None:
                self.on_fatal()
        finally:
            self._notify_stop.set()

    def require_ready(self) -> Engine:
        if self.status == "ok":
            return self.engine
        if self.status == "error":
            raise APIError(503, f"the model failed to load: {self.error}", "server_error", code="model_load_failed")
        raise APIError(503, f"the model is loading ({self.progress})", "server_error", code="model_loading",
                       headers={"Retry-After": "5"})

    def shutdown(self) -> None:
        sd_notify("STOPPING=1\nSTATUS=stopping")
        self._notify_stop.set()
        idle = self.worker.stop() if self.worker._thread.is_alive() else True
        if self.engine is not None and idle:
            self.engine.close()


DRAIN_S = 25.0  # on SIGTERM a running stream may finish for this long (uvicorn's own limit is 30 s)


def _sse(gen) -> Response:
    import anyio
    from sse_starlette.sse import EventSourceResponse

    # With a shutdown_event, sse-starlette lets the stream run on for the grace period instead of cutting it.
    return EventSourceResponse(gen, ping=15, shutdown_event=anyio.Event(), shutdown_grace_period=DRAIN_S)


def _chunk_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def _events(job: Job, request: Request, watch_disconnect: bool = True):
    """Yield the job's events. Non-streaming: cancel the job when the client disconnects (polled while waiting);
    streaming responses are cancelled by sse-starlette instead, which runs the generator's `finally`."""
    while True:
        try:
            ev = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if watch_disconnect and await request.is_disconnected():
                job.cancelled.set()
                return
            continue
        yield ev
        if ev[0] in ("done", "error"):
            return


def create_app(config: ServerConfig, loader: Callable[..., Engine] = load_engine, load_in_thread: bool = True) -> Starlette:
    state = ServerState(config, loader)

    def check_auth(request: Request) -> None:
        if not config.api_key:
            return
        bearer = request.headers.get("authorization", "")
        if bearer != f"Bearer {config.api_key}" and request.headers.get("x-api-key") != config.api_key:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                           "invalid_request_error", code="invalid_api_key")

    def endpoint(fn):
        async def wrapped(request: Request) -> Response:
            try:
                if request.url.path.startswith("/v1/"):
                    check_auth(request)
                return await fn(request)
            except APIError as exc:
                log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
                return exc.response(anthropic=request.url.path.startswith("/v1/messages"))
            except (apis.RequestError, chat.ChatFormatError) as exc:
                log.info("%s %s -> 400 %s", request.method, request.url.path, exc.message)
                return APIError(400, exc.message, param=getattr(exc, "param", None), code="invalid_value").response(
                    anthropic=request.url.path.startswith("/v1/messages"))
        return wrapped

    async def health(request: Request) -> Response:
        body = {"status": state.status, "progress": state.progress, "percent": state.percent, "uptime_s": round(time.time() - state.started, 1)}
        if state.status == "ok":
            eng = state.engine
            body.update(model=eng.model_id, ctx=eng.max_ctx, queue=state.worker.waiting, stats=state.worker.stats)
            return JSONResponse(body)
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    async def models(request: Request) -> Response:
        eng = state.require_ready()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started))
        # OpenAI's fields, then Anthropic's (type, display_name, created_at, paging): one listing for both clients
        return JSONResponse({"object": "list", "data": [
            {"id": eng.model_id, "object": "model", "created": int(state.started), "owned_by": "spark-setup",
             "max_model_len": eng.max_ctx, "type": "model", "display_name": eng.model_id, "created_at": created,
             "max_input_tokens": eng.max_ctx}],
            "has_more": False, "first_id": eng.model_id, "last_id": eng.model_id})

    def make_job(eng: Engine, prompt: list[int], params: SamplingParams, thinking: bool) -> Job:
        if len(prompt) >= eng.max_ctx:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's context is {eng.max_ctx} "
                                f"tokens (prompt + completion)", param="messages", code="context_length_exceeded")
        job = Job(prompt, params, thinking, asyncio.get_running_loop())
        state.worker.submit(job)
        return job

    async def collect(job: Job, request: Request) -> apis.Answer:
        """A non-streamed job's answer; its `result` is None when the client went away."""
        reasoning, content, finish, result, calls = [], [], "stop", None, []
        async for ev in _events(job, request):
            if ev[0] == "delta":
                (reasoning if ev[1] == "reasoning" else content).append(ev[2])
            elif ev[0] == "tool_calls":
                calls = ev[1]
            elif ev[0] == "error":
                raise APIError(ev[1], ev[2], "server_error")
            else:
                finish, result = ev[1], ev[2]
        return apis.Answer("".join(reasoning), "".join(content), finish, result, calls)

    def chat_prompt(eng: Engine, messages: list, thinking: bool, tools: Any = None, tool_choice: Any = None,
                    max_effort: bool = False) -> tuple[list[int], bool]:
        """(prompt ids, whether tools were offered) of a chat-shaped request. `tools`: the request's tool list
        (OpenAI's shapes, or function definitions); tool_choice "none" renders none."""
        try:
            schemas = chat.tool_schemas(tools) if tools and tool_choice != "none" else None
            prompt = chat.encode(eng.tokenizer, messages, thinking=thinking, tools=schemas, max_effort=max_effort)
        except chat.ChatFormatError as exc:
            raise APIError(400, exc.message, param="tools" if "tools" in exc.message else "messages",
                           code="invalid_value")
        return prompt, bool(schemas)

    def chat_job(eng: Engine, messages: list, thinking: bool, fields: dict, tools: Any = None,
                 tool_choice: Any = None, max_effort: bool = False) -> Job:
        prompt, offered = chat_prompt(eng, messages, thinking, tools, tool_choice, max_effort)
        job = make_job(eng, prompt, sampling_from(fields, None, eng.tokenizer.n_vocab), thinking)
        job.tools = offered
        return job

    def sse_of(job: Job, events) -> Response:
        async def gen():
            try:
                async for x in events:
                    yield x
            finally:
                job.cancelled.set()  # no-op when finished; stops the worker when the client went away
        return _sse(gen())

    async def chat_completions(request: Request) -> Response:
        eng = state.require_ready()
        body = await read_json(request)
        try:
            messages = chat.parse_messages(body.get("messages"))
        except chat.ChatFormatError as exc:
            raise APIError(400, exc.message, param="messages", code="invalid_value")
        kwargs = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
        thinking, max_effort = reasoning_from(body, body.get("reasoning_effort", kwargs.get("reasoning_effort")))
        stream = _get(body, "stream", bool, False)
        opts = _get(body, "stream_options", dict, {}) or {}
        include_usage = bool(opts.get("include_usage"))
        job = chat_job(eng, messages, thinking, body, body.get("tools"), body.get("tool_choice"), max_effort)
        cid, created, model = _chunk_id("chatcmpl"), int(time.time()), eng.model_id

        if stream:
            def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                     if choices else []}
                if usage is not None:
                    c["usage"] = usage
                return json.dumps(c, ensure_ascii=False)

            async def gen():
                # The role travels with the first generated text (after prefill), as llama-server and ds4 do, so a
                # client's time to first chunk measures prefill, not HTTP latency (llama-benchy's ttfr/est_ppt).
                role = {"role": "assistant"}
                async for ev in _events(job, request, watch_disconnect=False):
                    if ev[0] == "delta":
                        key = "reasoning_content" if ev[1] == "reasoning" else "content"
                        yield {"data": chunk({**role, key: ev[2]})}
                        role = {}
                    elif ev[0] == "tool_calls":
                        yield {"data": chunk({**role, "tool_calls": [
                            {"index": n, **apis.openai_call(c)} for n, c in enumerate(ev[1])]})}
                        role = {}
                    elif ev[0] == "error":
                        yield {"data": json.dumps({"error": {"message": ev[2], "type": "server_error",
                                                             "param": None, "code": None}})}
                        return
                    elif ev[0] == "done":
                        if role:  # nothing was generated: the role still comes first
                            yield {"data": chunk({**role, "content": ""})}
                        yield {"data": chunk({}, finish=ev[1] if ev[1] != "cancelled" else "stop")}
                        if include_usage and ev[2]:
                            yield {"data": chunk({}, usage=ev[2]["usage"], choices=False)}
                        yield {"data": "[DONE]"}

            return sse_of(job, gen())

        a = await collect(job, request)
        if a.result is None:  # client gone
            return Response(status_code=499)
        message: dict[str, Any] = {"role": "assistant", "content": a.content if a.content or not a.calls else None}
        if thinking:
            message["reasoning_content"] = a.reasoning
        if a.calls:
            message["tool_calls"] = [apis.openai_call(c) for c in a.calls]
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": a.finish}],
            "usage": a.result["usage"], "timings": a.result["timings"]})

    async def completions(request: Request) -> Response:
        eng = state.require_ready()
        body = await read_json(request)
        tok = eng.tokenizer
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if isinstance(raw, str):
            if not raw:
                raise APIError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
            prompt = tok.encode(raw)
        elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            if not all(0 <= t < tok.n_vocab for t in raw):
                raise APIError(400, f"'prompt' token ids must be in [0, {tok.n_vocab})", param="prompt",
                               code="invalid_value")
            prompt = list(raw)
        else:
            raise APIError(400, "'prompt' must be a string or an array of token ids", param="prompt",
                           code="invalid_type")
        if prompt[0] != tok.bos_id:
            prompt = [tok.bos_id] + prompt
        stream = _get(body, "stream", bool, False)
        opts = _get(body, "stream_options", dict, {}) or {}
        params = sampling_from(body, COMPLETIONS_DEFAULT_MAX_TOKENS, tok.n_vocab)
        job = make_job(eng, prompt, params, thinking=False)
        cid, created, model = _chunk_id("cmpl"), int(time.time()), eng.model_id

        def obj(text: str, finish=None, usage=None, choices=True) -> dict:
            o = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}] if choices else []}
            if usage is not None:
                o["usage"] = usage
            return o

        if stream:
            async def gen():
                async for ev in _events(job, request, watch_disconnect=False):
                    if ev[0] == "delta":
                        yield {"data": json.dumps(obj(ev[2]), ensure_ascii=False)}
                    elif ev[0] == "error":
                        yield {"data": json.dumps({"error": {"message": ev[2], "type": "server_error"}})}
                        return
                    else:
                        yield {"data": json.dumps(obj("", ev[1] if ev[1] != "cancelled" else "stop"))}
                        if opts.get("include_usage") and ev[2]:
                            yield {"data": json.dumps(obj("", usage=ev[2]["usage"], choices=False))}
                        yield {"data": "[DONE]"}

            return sse_of(job, gen())

        a = await collect(job, request)
        if a.result is None:
            return Response(status_code=499)
        return JSONResponse({**obj(a.content, a.finish, a.result["usage"]), "timings": a.result["timings"]})

    async def anthropic_messages(request: Request) -> Response:
        eng = state.require_ready()
        body = await read_json(request)
        messages, fields, tools = apis.anthropic_request(body)
        thinking = thinking_from(body)
        job = chat_job(eng, messages, thinking, fields, tools)
        msg_id, model = apis.new_id("msg"), eng.model_id
        if _get(body, "stream", bool, False):
            return sse_of(job, apis.anthropic_events(model, msg_id, len(job.prompt),
                                                     _events(job, request, watch_disconnect=False)))
        a = await collect(job, request)
        if a.result is None:
            return Response(status_code=499)
        return JSONResponse(apis.anthropic_message(model, msg_id, a, thinking))

    async def anthropic_count_tokens(request: Request) -> Response:
        eng = state.require_ready()
        body = await read_json(request)
        messages, _, tools = apis.anthropic_request({"max_tokens": 1, **body})  # count_tokens has no max_tokens
        prompt, _ = chat_prompt(eng, messages, thinking_from(body), tools)
        return JSONResponse({"input_tokens": len(prompt)})

    async def responses(request: Request) -> Response:
        eng = state.require_ready()
        body = await read_json(request)
        messages, fields, effort = apis.responses_request(body)
        thinking, max_effort = reasoning_from(body, effort)
        job = chat_job(eng, messages, thinking, fields, body.get("tools"), body.get("tool_choice"), max_effort)
        builder = apis.ResponsesBuilder(eng.model_id, body, thinking)
        if _get(body, "stream", bool, False):
            return sse_of(job, builder.events(_events(job, request, watch_disconnect=False)))
        a = await collect(job, request)
        if a.result is None:
            return Response(status_code=499)
        return JSONResponse(builder.response(a))

    async def not_found(request: Request, exc) -> Response:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def method_not_allowed(request: Request, exc) -> Response:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_in_thread:
            threading.Thread(target=state.load, name="model-loader", daemon=True).start()
        else:
            state.load()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.shutdown)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", endpoint(models), methods=["GET"]),
            Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
            Route("/v1/completions", endpoint(completions), methods=["POST"]),
            Route("/v1/messages", endpoint(anthropic_messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", endpoint(anthropic_count_tokens), methods=["POST"]),
            Route("/v1/responses", endpoint(responses), methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed},
        lifespan=lifespan,
    )
    app.state.server = state
    return app


# ---------------------------------------------------------------------------------------------------------------
# running it


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so a busy port is a clear error before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off only on accepted sockets whose proto says TCP, and
    # with Nagle on, every response after the first on a kept-alive connection waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def _stderr_is(path: Path) -> bool:
    """True when stderr already goes to `path` (a detached server started with its output in the log)."""
    try:
        a, b = os.fstat(2), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def setup_logging(log_file: Path | None) -> None:
    """Server events go to stderr (journald under systemd) and, when given, to a small rotating log file."""
    from logging.handlers import RotatingFileHandler

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None and not _stderr_is(log_file):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(log_file, maxBytes=2_000_000, backupCount=2, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
    for name in ("spark_setup.server", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(logging.INFO)
        lg.propagate = False


def serve(config: ServerConfig, host: str, port: int, log_file: Path | None = None,
          loader: Callable[..., Engine] = load_engine) -> int:
    """Run until SIGTERM/SIGINT; in-flight requests finish (up to 30 s), then exit 0."""
    import uvicorn

    setup_logging(log_file)
    sock = bind_socket(host, port)
    app = create_app(config, loader)
    log.info("listening on http://%s:%d (model %s)", host, port, config.model_path)
    if host not in ("127.0.0.1", "::1", "localhost") and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    ucfg = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=30,
                          access_log=True, timeout_keep_alive=5)
    server = uvicorn.Server(ucfg)
    state: ServerState = app.state.server

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    # uvicorn drains on SIGTERM/SIGINT and then re-raises the signal to the handler that was installed before it;
    # with Python's default that kills the process (exit 143) after a clean drain. Ours just lets it return 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.status == "error":
        from ..errors import UserError

        raise UserError(f"the server could not load {config.model_path}: {state.error}",
                        getattr(state.load_exc, "hint", None) or "check the model file and the engine build "
                        "(spark-setup doctor, spark-setup build)")
    log.info("stopped")
    return 0
