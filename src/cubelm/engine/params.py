"""``SamplingParams``: what a request asks for, with vLLM's field names, validated on construction.

The one sampling-parameter class: the engine, the server and the reference generator (``cubelm generate``) all
take it. Invalid values raise ``ValueError`` (``CubelmError`` is one) naming the parameter and its allowed range.
Every float must be finite; ranges are vLLM's, plus bounds that keep one request from costing unbounded work or
overflowing a C type (``seed`` is a signed 64-bit integer, ``n`` at most ``MAX_N``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cubelm.engine.sampling import SAMPLING_EPS
from cubelm.errors import CubelmError

MAX_N = 1024  # completions per prompt; the server's --max-n (default 128) is usually tighter
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (anything below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's spelling) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to return per generated token (0 = only the sampled one)
    skip_special_tokens: bool = True
    output_kind: str = "final"  # "delta": new text/ids every step (streams); "final": everything once, at the end

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise CubelmError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                   value, "a finite number")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n, f"an integer in [1, {MAX_N}]")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 or -1 (off)")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0 (1 = off)")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               "in [0, max_tokens]")
        _check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX), "seed", self.seed,
               "None or a signed 64-bit integer")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
               self.logprobs, f"None or in [0, {MAX_LOGPROBS}]")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")
        _check(self.output_kind in ("delta", "final"), "output_kind", self.output_kind, "'delta' or 'final'")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def seed_for(self, index: int) -> int | None:
        """The seed of completion ``index`` of ``n``: ``seed + index``, wrapped into what torch accepts."""
        return None if self.seed is None else (self.seed + index) % 2**64

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise CubelmError(f"{name} must be {allowed}, got {value!r}")
