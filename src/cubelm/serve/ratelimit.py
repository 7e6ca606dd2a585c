"""Per-client rate limits (§6.1.4): requests per minute and tokens per minute, one of five strategies.

The client is its API key (hashed) or, without a key, its IP address. Strategies:

==========================  ====================================================================================
``fixed-window``            ``limits.FixedWindowRateLimiter``: N per minute, the window starting at the first
                            hit; one counter, but allows 2N across a window boundary.
``sliding-window``          ``limits.MovingWindowRateLimiter``: the book's sliding window *log*, exact: N in any
                            60 s; stores one entry per unit, so tokens/min budgets cost memory.
``sliding-window-counter``  ``limits.SlidingWindowCounterRateLimiter``: the weighted two-window approximation.
``token-bucket``            ``cubelm.serve.buckets``: bursts up to the capacity, refilled at N/60 per second.
``leaky-bucket``            ``cubelm.serve.buckets``: a queue drained at N/60 per second; admitted requests wait
                            their turn (smoothing), requests that would overflow the queue are refused.
==========================  ====================================================================================

The token cost of a request is charged up front as prompt tokens + ``n`` x ``max_tokens`` (what OpenAI does), so a
request that would overrun the budget is refused before it uses the engine. A refused request answers 429 with
``Retry-After`` (whole seconds, rounded up). Storage is in memory, or Redis (``redis://host:port``) so that several
replicas share one budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cubelm.errors import CubelmError
from cubelm.serve.buckets import Bucket
from cubelm.serve.errors import APIError

STRATEGIES = ("fixed-window", "sliding-window", "sliding-window-counter", "token-bucket", "leaky-bucket")


@dataclass(slots=True, kw_only=True)
class RateLimitConfig:
    strategy: str = "fixed-window"
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    burst_seconds: float = 60.0  # bucket capacity, in seconds of the rate (token and leaky buckets)
    storage_uri: str = "memory://"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CubelmError(f"rate-limit strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise CubelmError(f"{name} must be an integer >= 1 (or unset for no limit), got {v!r}")
        if not self.burst_seconds > 0:
            raise CubelmError(f"rate-limit burst must be > 0 seconds, got {self.burst_seconds}")

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class Budget:
    """One per-minute budget (requests or tokens) under one strategy."""

    def __init__(self, name: str, per_minute: int, config: RateLimitConfig, storage, clock):
        self.name, self.per_minute, self.clock = name, per_minute, clock
        self.strategy = config.strategy
        if self.strategy in ("token-bucket", "leaky-bucket"):
            rate = per_minute / 60
            self.capacity = max(1, round(rate * config.burst_seconds))
            self.bucket = Bucket(self.strategy.split("-")[0], storage, rate_per_s=rate, capacity=self.capacity,
                                 prefix=f"cubelm:rl:{self.strategy}:{name}")
        else:
            from limits import RateLimitItemPerMinute, strategies
            cls = {"fixed-window": strategies.FixedWindowRateLimiter,
                   "sliding-window": strategies.MovingWindowRateLimiter,
                   "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter}[self.strategy]
            self.limiter = cls(storage)
            self.item = RateLimitItemPerMinute(per_minute, namespace="cubelm")
            self.capacity = per_minute

    def hit(self, key: str, cost: int, *, commit: bool = True) -> tuple[bool, float]:
        """(allowed, wait): the delay before serving when allowed, the Retry-After when refused. With
        ``commit=False`` nothing is spent."""
        if cost > self.capacity:
            raise APIError(400, f"this request needs {cost} {self.name} but the rate limit allows at most "
                                f"{self.capacity} at once; ask for fewer (lower max_tokens or n)",
                           param="max_tokens" if self.name == "tokens" else None, code="request_too_large")
        if self.strategy in ("token-bucket", "leaky-bucket"):
            return self.bucket.hit(key, cost, self.clock(), commit=commit)
        # test first: a refused fixed-window hit would otherwise still be counted against the window
        if self.limiter.test(self.item, self.name, key, cost=cost) and (
                not commit or self.limiter.hit(self.item, self.name, key, cost=cost)):
            return True, 0.0
        reset = self.limiter.get_window_stats(self.item, self.name, key).reset_time
        # NOTE: the sliding log's edge is exclusive: at exactly ``reset`` the oldest hit still counts
        edge = 1e-3 if self.strategy == "sliding-window" else 0.0
        return False, max(0.0, reset - self.clock()) + edge


class RateLimiter:
    def __init__(self, config: RateLimitConfig, *, clock=time.time):
        from limits.storage import storage_from_string
        self.config = config
        try:
            self.storage = storage_from_string(config.storage_uri)
        except Exception as e:  # noqa: BLE001 - a bad URI or a missing driver is a configuration mistake
            raise CubelmError(f"rate-limit storage {config.storage_uri!r} is not usable: {e}") from None
        self.budgets = []
        if config.requests_per_minute:
            self.budgets.append(Budget("requests", config.requests_per_minute, config, self.storage, clock))
        if config.tokens_per_minute:
            self.budgets.append(Budget("tokens", config.tokens_per_minute, config, self.storage, clock))

    def check_storage(self) -> None:
        if not self.storage.check():
            raise CubelmError(f"rate-limit storage {self.config.storage_uri} does not answer; start it or use "
                              f"memory://")

    def admit(self, client: str, num_tokens: int) -> float:
        """Charge one request and ``num_tokens``; the delay to wait before serving, or a 429 ``APIError``.

        Every budget is checked before any is spent, so a request refused on tokens has not used up a request.
        (Two replicas racing between the check and the spend can still charge one budget of a refused request.)
        """
        costs = [(b, 1 if b.name == "requests" else num_tokens) for b in self.budgets]
        for commit in (False, True):
            delay = 0.0
            for budget, cost in costs:
                ok, wait = budget.hit(client, cost, commit=commit)
                if not ok:
                    raise self._refusal(budget, wait)
                delay = max(delay, wait)
        return delay

    def precheck(self, client: str) -> None:
        """A 429 when ``client`` could not be admitted even at the smallest cost (one request, one token); spends
        nothing. For routes that do work before they know the request's token count (retrieval before a RAG
        prompt exists): a client over its limit is refused before that work, not after it."""
        for budget in self.budgets:
            ok, wait = budget.hit(client, 1, commit=False)
            if not ok:
                raise self._refusal(budget, wait)

    def _refusal(self, budget: Budget, wait: float) -> APIError:
        retry = max(1, math.ceil(wait))
        return APIError(429, f"rate limit reached for {budget.name} per minute ({budget.per_minute}, "
                             f"{self.config.strategy}); retry after {retry} s",
                        type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
