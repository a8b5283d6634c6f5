"""Choosing the next token from logits, and the stop rules around it.

Order of the filters (each one optional): logit_bias -> presence/frequency penalties (OpenAI's: each token already
generated loses presence_penalty once and frequency_penalty per time it was generated) -> temperature -> top_k ->
softmax -> min_p (keep tokens whose probability
is at least min_p times the best one) -> top_p (smallest set whose mass reaches top_p) -> draw. Temperature 0 is
greedy (argmax, lowest id on ties). A seed makes the draw sequence reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.05


@dataclass
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0  # 0 = off
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None
    max_tokens: int | None = None  # None = until EOS or the context is full
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans it)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError("temperature must be between 0 and 100")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError("min_p must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be non-empty strings")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2")


class Sampler:
    """One generation's sampler: it counts the tokens it has chosen, for the penalties."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.counts: dict[int, int] = {}

    def __call__(self, logits: np.ndarray) -> int:
        token = sample(logits, self.params, self.rng, self.counts)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           counts: dict[int, int] | None = None) -> int:
    logits = np.asarray(logits).reshape(-1)
    if p.logit_bias:
        logits = logits.astype(np.float64)
        for tid, bias in p.logit_bias.items():
            # -100 bans a token outright, as OpenAI documents it
            logits[tid] = -np.inf if bias <= -100.0 else logits[tid] + bias
    if counts and (p.presence_penalty or p.frequency_penalty):
        logits = logits.astype(np.float64)  # a copy: the caller's logits stay as they are
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        logits[ids] -= n * p.frequency_penalty + p.presence_penalty
    if p.temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / p.temperature
    # Work on the few candidates that can survive: min_p keeps p_i >= min_p * p_max, i.e. z_i >= z_max + ln(min_p)
    # (the max always survives top_k too, so the threshold is the same before or after it).
    zmax = float(np.max(z))
    # Without min_p, tokens below e^-30 of the best (together < 1e-7 of the mass on a 129k vocabulary) are dropped.
    cand = np.flatnonzero(z >= zmax + max(np.log(p.min_p) if p.min_p > 0.0 else -30.0, -30.0))
    if p.top_k and p.top_k < cand.size:
        part = np.argpartition(-z[cand], p.top_k - 1)[: p.top_k]
        kth = z[cand][part].min()
        cand = cand[z[cand] >= kth]  # ties at the k-th value all stay
    probs = np.exp(z[cand] - zmax)
    probs /= probs.sum()
    if p.top_p < 1.0:
        # the smallest most-likely set reaching top_p: sort only a growing head of the candidates
        k = min(64, cand.size)
        while True:
            head = np.argpartition(-probs, k - 1)[:k] if k < cand.size else np.arange(cand.size)
            head = head[np.lexsort((cand[head], -probs[head]))]  # most likely first, lower id on ties
            cum = np.cumsum(probs[head])
            if cum[-1] >= p.top_p or k == cand.size:
                n = min(int(np.searchsorted(cum, p.top_p) + 1), k)
                cand, probs = cand[head[:n]], probs[head[:n]] / cum[n - 1]
                break
            k = min(4 * k, cand.size)
    return int(cand[rng.choice(cand.size, p=probs)])


class StopMatcher:
    """Feeds generated text through the client's stop strings.

    `push(text)` returns (text safe to emit now, stopped). Text that might be the start of a stop string is held
    back until it is decided, so a stop string split across tokens is still caught and never emitted.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [(i, n, s) for n, s in enumerate(self.stops) if (i := buf.find(s)) >= 0]
        if hits:
            cut, _, self.matched = min(hits)  # the earliest; of those starting there, the first listed
            self._held = ""
            return buf[:cut], True
        keep = 0  # the longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
