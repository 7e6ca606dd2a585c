"""Rate limits (every strategy, with a fake clock), API-key loading, and Redis-shared budgets across processes."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from cubelm.errors import CubelmError
from cubelm.serve.auth import KeyChecker, load_api_keys
from cubelm.serve.errors import APIError
from cubelm.serve.ratelimit import STRATEGIES, RateLimitConfig, RateLimiter


class FakeClock:
    """Replaces ``time.time`` in ``limits`` (its memory storage and strategies read it directly) and in ours."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def time(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    import limits.storage.memory
    import limits.strategies
    c = FakeClock()
    monkeypatch.setattr(limits.storage.memory, "time", c)
    monkeypatch.setattr(limits.strategies, "time", c)
    return c


def limiter(strategy: str, clock, storage="memory://", **kw) -> RateLimiter:
    return RateLimiter(RateLimitConfig(strategy=strategy, storage_uri=storage, **kw), clock=clock.time)


def spend(rl: RateLimiter, client: str, times: int, tokens: int = 1) -> None:
    for _ in range(times):
        rl.admit(client, tokens)


def refused(rl: RateLimiter, client: str, tokens: int = 1) -> APIError:
    with pytest.raises(APIError) as e:
        rl.admit(client, tokens)
    assert e.value.status == 429 and e.value.type == "rate_limit_error"
    return e.value


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_refuses_exactly_when_spent(strategy, clock):
    rl = limiter(strategy, clock, requests_per_minute=5)
    spend(rl, "a", 5)  # the whole budget passes ...
    e = refused(rl, "a")  # ... and the next one does not
    retry = int(e.headers["Retry-After"])
    # fixed: the window ends 60 s after its first hit; sliding log: the oldest hit leaves after 60 s (+1: the edge
    # is exclusive); buckets: 1 per 12 s
    expected = {"fixed-window": 60, "sliding-window": 61, "token-bucket": 12, "leaky-bucket": 12}.get(strategy)
    if expected is not None:
        assert retry == expected, (strategy, retry)
        clock.t += retry - 1
        refused(rl, "a")  # a second early is still too early
        clock.t += 1
    else:  # the sliding-window counter's Retry-After is an estimate (weighted count); it never exceeds a window
        assert 1 <= retry <= 61
        clock.t += 61
    spend(rl, "a", 1)  # after Retry-After seconds the request passes
    spend(rl, "b", 1)  # other clients have their own budget


def test_sliding_window_has_no_boundary_burst(clock):
    fixed, sliding = (limiter(k, clock, requests_per_minute=4) for k in ("fixed-window", "sliding-window"))
    for rl in (fixed, sliding):
        spend(rl, "a", 1)
    clock.t += 59
    for rl in (fixed, sliding):
        spend(rl, "a", 3)
    clock.t += 2  # the fixed window (started by the first hit) is over: 4 more within 2 s
    spend(fixed, "a", 4)
    spend(sliding, "a", 1)  # only the request from 61 s ago has left the sliding window
    refused(sliding, "a")


def test_token_bucket_refills_and_leaky_bucket_delays(clock):
    tb = limiter("token-bucket", clock, requests_per_minute=60, burst_seconds=3)  # 1/s, capacity 3
    spend(tb, "a", 3)
    assert refused(tb, "a").headers["Retry-After"] == "1"
    clock.t += 2
    spend(tb, "a", 2)
    refused(tb, "a")
    lb = limiter("leaky-bucket", clock, requests_per_minute=60, burst_seconds=3)  # drains 1/s, queue of 3
    delays = [lb.admit("a", 1) for _ in range(3)]
    assert delays == [0.0, 1.0, 2.0]  # smoothed: each waits for the work ahead of it
    assert refused(lb, "a").headers["Retry-After"] == "1"
    clock.t += 1.5
    assert lb.admit("a", 1) == pytest.approx(1.5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tokens_per_minute(strategy, clock):
    rl = limiter(strategy, clock, tokens_per_minute=100)
    rl.admit("a", 60)
    rl.admit("a", 40)
    refused(rl, "a", 1)
    with pytest.raises(APIError) as e:  # can never fit: a 400, not a 429 to retry forever
        rl.admit("b", 101)
    assert e.value.status == 400 and "at most 100" in e.value.message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refused_on_tokens_spends_no_request(strategy, clock):
    rl = limiter(strategy, clock, requests_per_minute=3, tokens_per_minute=100)
    rl.admit("a", 100)
    for _ in range(3):  # had these spent requests, the third would be refused on requests (1 + 2 of 3 used)
        assert "for tokens" in refused(rl, "a", 50).message


@pytest.mark.parametrize("kind", ["token", "leaky"])
def test_in_memory_buckets_forget_idle_clients(kind):
    from limits.storage import MemoryStorage

    from cubelm.serve.buckets import _MIN_SWEEP, Bucket
    b = Bucket(kind, MemoryStorage(), rate_per_s=1.0, capacity=10, prefix="t")
    for i in range(_MIN_SWEEP - 1):
        assert b.hit(f"c{i}", 1, now=0.0)[0]
    assert len(b._states) == _MIN_SWEEP - 1  # all still spent: none may be forgotten yet
    assert b.hit("late", 5, now=5.0)[0]  # 1023 buckets refilled / drained by now; "late" is not
    assert set(b._states) == {"t:late"}
    assert b.hit("late", 6, now=5.0) == (False, pytest.approx(1.0))  # its state was kept: 5 + 6 > 10


def test_config_errors_are_clear():
    with pytest.raises(CubelmError, match="one of"):
        RateLimitConfig(strategy="lottery")
    with pytest.raises(CubelmError, match="requests_per_minute"):
        RateLimitConfig(requests_per_minute=0)


def test_api_keys_from_flags_file_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file\n\n")
    keys = load_api_keys(["sk-a", "sk-a"], str(f), {"CUBELM_API_KEYS": "sk-env1, sk-env2"})
    assert keys == ["sk-a", "sk-file", "sk-env1", "sk-env2"]
    kc = KeyChecker(keys)
    assert kc.check({"authorization": "Bearer sk-env2"}) == "sk-env2"
    assert kc.check({"x-api-key": "sk-file"}) == "sk-file"
    for headers in ({}, {"authorization": "Bearer sk-ab"}, {"authorization": "Basic sk-a"}, {"x-api-key": "sk"}):
        with pytest.raises(APIError) as e:
            kc.check(headers)
        assert e.value.status == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(CubelmError, match="does not exist"):
        load_api_keys([], str(tmp_path / "absent"), {})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_http_429_with_retry_after(strategy, inprocess_server):
    # buckets: 10/s with room for 3; four requests sent at once, faster than a bucket refills or drains one
    s = inprocess_server(rate_limit_strategy=strategy, rate_limit_rpm=3 if "window" in strategy else 600,
                         rate_limit_burst_seconds=0.3, api_key=["sk-1"])
    h = {"Authorization": "Bearer sk-1"}
    body = {"model": "m", "prompt": "x", "max_tokens": 1, "stream": True}

    async def burst():
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(c.post(f"{s.base}/v1/completions", json=body, headers=h)
                                          for _ in range(4)))

    rs = asyncio.run(burst())
    assert sorted(r.status_code for r in rs) == [200, 200, 200, 429]
    r = next(r for r in rs if r.status_code == 429)
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and "requests per minute" in r.json()["error"]["message"]
    if "window" in strategy:
        import openai
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{s.base}/v1", api_key="sk-1", max_retries=0).completions.create(
                model="m", prompt="x", max_tokens=1)


# ---- Redis ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_redis_strategies_match_memory(strategy, redis_url, clock):
    if strategy not in ("token-bucket", "leaky-bucket"):
        clock = FakeClock(__import__("time").time())  # limits' Redis strategies use the server's clock
    rl = limiter(strategy, clock, storage=redis_url, requests_per_minute=5)
    rl.check_storage()
    client = f"test:{uuid.uuid4().hex}"
    spend(rl, client, 5)
    e = refused(rl, client)
    assert 1 <= int(e.headers["Retry-After"]) <= 61
    if strategy in ("token-bucket", "leaky-bucket"):
        assert e.headers["Retry-After"] == "12"
        clock.t += 12
        budget = rl.budgets[0]
        for _ in range(3):  # looking does not spend
            assert budget.hit(client, 1, commit=False)[0]
        spend(rl, client, 1)
        refused(rl, client)


def test_two_servers_share_one_redis_budget(redis_url, serve_process):
    key = f"sk-{uuid.uuid4().hex}"
    args = ("--api-key", key, "--rate-limit-rpm", "4", "--rate-limit-storage", redis_url,
            "--rate-limit-strategy", "sliding-window")

    async def both():
        return [p for p in await asyncio.gather(*(asyncio.to_thread(serve_process, *args) for _ in range(2)))]

    a, b = asyncio.run(both())
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    codes = [httpx.post(f"{srv.base}/v1/completions", json=body, headers=h, timeout=30).status_code
             for srv in (a, b, a, b, a, b)]
    assert codes == [200, 200, 200, 200, 429, 429]
