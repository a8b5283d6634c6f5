"""Choosing the next token from logits, and the stop rules around it.

Order of the filters (each one optional): logit_bias -> temperature -> top_k -> softmax -> min_p (keep tokens whose probability
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


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        return sample(logits, self.params, self.rng)


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if p.logit_bias:
        logits = logits.copy()
        for tid, bias in p.logit_bias.items():
            # -100 bans a token outright, as OpenAI documents it
            logits[tid] = -np.inf if bias <= -100.0 else logits[tid] + bias
    if p.temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits / p.temperature
    if p.top_k and p.top_k < z.size:
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = z - np.max(z)
    probs = np.exp(z)
    probs /= probs.sum()
    if p.min_p > 0.0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order]) / probs.sum()
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = 1.0
        probs = probs * mask
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class StopMatcher:
    """Feeds generated text through the client's stop strings.

    `push(text)` returns (text safe to emit now, stopped). Text that might be the start of a stop string is held
    back until it is decided, so a stop string split across tokens is still caught and never emitted.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
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
