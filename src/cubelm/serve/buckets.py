"""Token bucket and leaky bucket limiters (the two of §6.1.4's four that the ``limits`` library lacks).

Both sit on the same storage ``limits`` uses: in memory (one process) or in Redis, where each check is one Lua
script, so it is atomic and several server replicas share one budget. Time comes from the caller (``now``), which
lets tests drive a fake clock; replicas sharing Redis need clocks in sync (NTP), as ``limits`` itself assumes.

- **Token bucket**: a bucket of ``capacity`` tokens refills at ``rate`` per second; a request takes ``cost``
  tokens or is refused. Bursts up to the capacity pass at once, the long-run rate is ``rate``.
- **Leaky bucket** (as a queue): admitted work drains at a constant ``rate``; a request joins the queue if the
  backlog stays within ``capacity`` and is *delayed* until the work ahead of it has drained, otherwise refused.
  Unlike the token bucket it smooths bursts into a steady flow instead of letting them through.

``hit`` returns ``(allowed, wait)``: when allowed, ``wait`` is the delay to serve it after (0 for the token
bucket); when refused, the seconds until the same request would be admitted (``Retry-After``). ``hit(...,
commit=False)`` answers the same without spending, so a caller with several budgets can check them all first.

In memory, a client's state is dropped once it is back to the fresh state (token bucket full again, leaky bucket
drained), so the table holds only clients seen within the last ``capacity / rate`` seconds; in Redis the key
expires then.
"""

from __future__ import annotations

import threading

_EPS = 1e-9  # float slack so that exactly spending the budget is allowed
_MIN_SWEEP = 1024  # clients held in memory before the first sweep of fresh buckets

_TOKEN_LUA = """
local rate, cap, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local commit = ARGV[5] == '1'
local s = redis.call('HMGET', KEYS[1], 'v', 't')
local v, t = tonumber(s[1]), tonumber(s[2])
if v == nil then v = cap; t = now end
if now < t then now = t end
v = math.min(cap, v + (now - t) * rate)
local ok, wait = 0, 0
if v + 1e-9 >= cost then v = v - cost; ok = 1 else wait = (cost - v) / rate end
if commit then
  redis.call('HSET', KEYS[1], 'v', tostring(v), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
end
return {ok, tostring(wait)}
"""

_LEAKY_LUA = """
local rate, cap, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local commit = ARGV[5] == '1'
local s = redis.call('HMGET', KEYS[1], 'v', 't')
local v, t = tonumber(s[1]) or 0, tonumber(s[2]) or now
if now < t then now = t end
v = math.max(0, v - (now - t) * rate)
local ok, wait = 0, 0
if v + cost <= cap + 1e-9 then wait = v / rate; v = v + cost; ok = 1 else wait = (v + cost - cap) / rate end
if commit then
  redis.call('HSET', KEYS[1], 'v', tostring(v), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
end
return {ok, tostring(wait)}
"""


def token_bucket_step(state: tuple[float, float] | None, now: float, rate: float, capacity: float, cost: float
                      ) -> tuple[tuple[float, float], bool, float]:
    tokens, t = state if state is not None else (capacity, now)
    now = max(now, t)  # a clock that steps back must not mint tokens
    tokens = min(capacity, tokens + (now - t) * rate)
    if tokens + _EPS >= cost:
        return (tokens - cost, now), True, 0.0
    return (tokens, now), False, (cost - tokens) / rate


def leaky_bucket_step(state: tuple[float, float] | None, now: float, rate: float, capacity: float, cost: float
                      ) -> tuple[tuple[float, float], bool, float]:
    level, t = state if state is not None else (0.0, now)
    now = max(now, t)
    level = max(0.0, level - (now - t) * rate)
    if level + cost <= capacity + _EPS:
        return (level + cost, now), True, level / rate
    return (level, now), False, (level + cost - capacity) / rate


class Bucket:
    """One bucket kind over a ``limits`` storage: ``kind`` is "token" or "leaky"."""

    def __init__(self, kind: str, storage, *, rate_per_s: float, capacity: float, prefix: str):
        if kind not in ("token", "leaky"):
            raise ValueError(f"bucket kind must be 'token' or 'leaky', got {kind!r}")
        self.kind, self.rate, self.capacity, self.prefix = kind, rate_per_s, capacity, prefix
        self._step = token_bucket_step if kind == "token" else leaky_bucket_step
        self._redis = _redis_client(storage)
        if self._redis is not None:
            self._script = self._redis.register_script(_TOKEN_LUA if kind == "token" else _LEAKY_LUA)
        self._states: dict[str, tuple[float, float]] = {}
        self._sweep_at = _MIN_SWEEP
        self._lock = threading.Lock()

    def hit(self, key: str, cost: float, now: float, *, commit: bool = True) -> tuple[bool, float]:
        name = f"{self.prefix}:{key}"
        if self._redis is not None:
            ok, wait = self._script(keys=[name], args=[repr(self.rate), repr(self.capacity), repr(now), cost,
                                                       int(commit)])
            return bool(int(ok)), float(wait)
        with self._lock:
            state, ok, wait = self._step(self._states.get(name), now, self.rate, self.capacity, cost)
            if commit:
                self._states[name] = state
                if len(self._states) >= self._sweep_at:
                    self._sweep(now)
            return ok, wait

    def _sweep(self, now: float) -> None:
        """Drop the clients whose bucket is back to the fresh state; amortized O(1) per hit (the next sweep waits
        until the table has doubled)."""
        self._states = {k: st for k, st in self._states.items() if not self._is_fresh(st, now)}
        self._sweep_at = max(_MIN_SWEEP, 2 * len(self._states))

    def _is_fresh(self, state: tuple[float, float], now: float) -> bool:
        value, t = state
        refilled = max(0.0, now - t) * self.rate
        return value + refilled >= self.capacity if self.kind == "token" else value <= refilled


def _redis_client(storage):
    """The redis client behind a ``limits`` Redis storage, or None for in-memory storage."""
    from limits.storage import MemoryStorage
    if isinstance(storage, MemoryStorage):
        return None
    get = getattr(storage, "get_connection", None)
    if get is None:
        raise ValueError(f"token and leaky buckets need memory:// or redis:// storage, got {type(storage).__name__}")
    return get()
