"""No request can hurt anyone else: adversarial requests against a live ``cubelm serve``, a request the engine
fails mid-batch, and an engine thread that dies (the server must turn unhealthy at once and exit non-zero)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import ServeProcess

NORMAL = {"model": "m", "prompt": "def add(", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MAX_BODY = 1 << 20


def raw(obj_text: str) -> bytes:
    """A body written by hand: JSON with escapes json.dumps would never produce (lone surrogates, 1e999)."""
    return obj_text.encode()


# (name, route, body: dict or raw bytes, expected status)
ADVERSARIAL = [
    # underflowing and extreme floats for every sampling field (valid values must work, not kill the engine)
    ("top_p underflows float32", "/v1/completions", {**NORMAL, "temperature": 1.0, "top_p": 1.8e-176}, 200),
    ("top_p denormal", "/v1/completions", {**NORMAL, "temperature": 1.0, "top_p": 5e-324}, 200),
    ("temperature 1e-300 with top_p", "/v1/completions", {**NORMAL, "temperature": 1e-300, "top_p": 0.5}, 200),
    ("temperature denormal", "/v1/completions", {**NORMAL, "temperature": 5e-324}, 200),
    ("temperature 1e300", "/v1/completions", {**NORMAL, "temperature": 1e300}, 200),
    ("temperature just above greedy", "/v1/completions", {**NORMAL, "temperature": 1.0001e-5}, 200),
    ("min_p denormal", "/v1/completions", {**NORMAL, "temperature": 1.0, "min_p": 5e-324}, 200),
    ("min_p 1", "/v1/completions", {**NORMAL, "temperature": 1.0, "min_p": 1.0}, 200),
    ("repetition_penalty tiny", "/v1/completions", {**NORMAL, "temperature": 1.0, "repetition_penalty": 1e-300}, 200),
    ("repetition_penalty huge", "/v1/completions", {**NORMAL, "temperature": 0.7, "repetition_penalty": 1e6}, 200),
    ("penalties at the bounds", "/v1/completions", {**NORMAL, "presence_penalty": -2, "frequency_penalty": 2}, 200),
    ("top_k huge", "/v1/completions", {**NORMAL, "temperature": 1.0, "top_k": 2**31 - 1}, 200),
    ("everything extreme in a stream", "/v1/completions", {**NORMAL, "temperature": 1e-300, "top_p": 1e-300,
                                                           "min_p": 1.0, "stream": True}, 200),
    ("tiny top_p chat stream", "/v1/chat/completions", {**CHAT, "temperature": 2, "top_p": 1e-320,
                                                        "stream": True}, 200),
    ("seed at int64 bounds", "/v1/completions", {**NORMAL, "temperature": 1, "seed": -2**63, "n": 2}, 200),
    ("seed max with n", "/v1/completions", {**NORMAL, "temperature": 1, "seed": 2**63 - 1, "n": 2}, 200),
    # values out of range: a clear 400
    ("temperature inf", "/v1/completions", raw('{"prompt": "x", "temperature": 1e999}'), 400),
    ("top_p NaN", "/v1/completions", raw('{"prompt": "x", "top_p": NaN}'), 400),
    ("top_p 0", "/v1/completions", {**NORMAL, "top_p": 0}, 400),
    ("seed 2**70", "/v1/completions", {**NORMAL, "seed": 2**70}, 400),
    ("seed -2**70", "/v1/completions", {**NORMAL, "seed": -2**70}, 400),
    ("n one million", "/v1/completions", {**NORMAL, "n": 1_000_000}, 400),
    ("n above --max-n", "/v1/completions", {**NORMAL, "n": 9}, 400),
    ("max_tokens 10**30", "/v1/completions", {**NORMAL, "max_tokens": 10**30}, 400),
    ("max_tokens beyond context", "/v1/completions", {**NORMAL, "max_tokens": 10**6}, 400),
    ("logprobs huge", "/v1/completions", {**NORMAL, "logprobs": 10**9}, 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400),
    ("min_tokens over max_tokens", "/v1/completions", {**NORMAL, "min_tokens": 100}, 400),
    ("top_k 10**30", "/v1/completions", {**NORMAL, "top_k": 10**30}, 400),
    ("string for an integer", "/v1/completions", {**NORMAL, "n": "2"}, 400),
    ("float for an integer", "/v1/completions", {**NORMAL, "max_tokens": 4.5}, 400),
    ("bool for a float", "/v1/completions", {**NORMAL, "temperature": True}, 400),
    # invalid UTF-16, huge lists, unsupported fields
    ("lone surrogate in prompt", "/v1/completions", raw('{"prompt": "a\\ud800b", "max_tokens": 2}'), 400),
    ("lone surrogate in chat", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400),
    ("lone surrogate in stop", "/v1/completions", raw('{"prompt": "x", "stop": ["\\ud83d"]}'), 400),
    ("100k stop strings", "/v1/completions", {**NORMAL, "stop": ["ab"] * 100_000}, 400),
    ("empty stop string", "/v1/completions", {**NORMAL, "stop": [""]}, 400),
    ("stop_token_ids beyond the vocabulary", "/v1/completions", {**NORMAL, "stop_token_ids": [10**6]}, 400),
    ("logit_bias", "/v1/completions", {**NORMAL, "logit_bias": {"5": 100}}, 400),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400),
    ("empty prompt", "/v1/completions", {**NORMAL, "prompt": ""}, 400),
    ("empty prompt list", "/v1/completions", {**NORMAL, "prompt": []}, 400),
    ("negative token id", "/v1/completions", {**NORMAL, "prompt": [5, -1]}, 400),
    ("token id beyond the vocabulary", "/v1/completions", {**NORMAL, "prompt": [5, 2**40]}, 400),
    ("detokenize floats", "/detokenize", {"tokens": [1.5, 2]}, 400),
    ("detokenize huge id", "/detokenize", {"tokens": [10**20]}, 400),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("image content part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    # malformed and oversized bodies
    ("malformed JSON", "/v1/completions", raw('{"prompt": "x", '), 400),
    ("JSON array body", "/v1/completions", raw('[1, 2, 3]'), 400),
    ("deeply nested JSON", "/v1/completions", raw('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"), 400),
    ("prompt of 300k characters", "/v1/completions", {**NORMAL, "prompt": "é" * 300_000}, 400),
    ("body over --max-request-bytes", "/v1/completions", {**NORMAL, "prompt": "x" * (2 * MAX_BODY)}, 413),
]


@pytest.fixture(scope="module")
def server(model_dir):
    p = ServeProcess(model_dir, "--max-n", "8", "--max-request-bytes", str(MAX_BODY), "--request-timeout", "30").start()
    yield p
    p.stop()


def _send(client: httpx.Client, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(route, content=body, headers={"Content-Type": "application/json"})
    return client.post(route, json=body)


@pytest.mark.parametrize("name, route, body, expected", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_request_hurts_nobody(server, name, route, body, expected):
    with httpx.Client(base_url=server.base, timeout=60) as c:
        r = _send(c, route, body)
        assert r.status_code == expected, r.text[:500]
        if expected != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape
        elif isinstance(body, dict) and body.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        else:
            assert r.json()["choices"] and r.json()["usage"]["completion_tokens"] >= 1
        # the server is unharmed: a normal request still works and the engine is alive
        assert c.post("/v1/completions", json=NORMAL).status_code == 200
        assert c.get("/health").status_code == 200


def test_a_failing_request_fails_alone(inprocess_server, monkeypatch):
    """An exception while processing one request (here: injected into its token post-processing) fails that
    request only, in both response modes; a request sharing its batches finishes normally; its blocks are freed."""
    from cubelm.engine.llm_engine import LLMEngine
    s = inprocess_server()
    original = LLMEngine._append_token

    def append_token(self, seq, token, lp, now):
        if self.requests[seq.request_id].prompt_token_ids[:1] == [7] and seq.num_output_tokens >= 2:
            raise RuntimeError("injected failure")
        return original(self, seq, token, lp, now)

    monkeypatch.setattr(LLMEngine, "_append_token", append_token)
    good = {**NORMAL, "prompt": [5, 6, 8, 9], "max_tokens": 40, "ignore_eos": True}
    bad = {**NORMAL, "prompt": [7, 6, 8, 9], "max_tokens": 40, "ignore_eos": True}
    results = {}

    def post(name, body):
        with httpx.Client(base_url=s.base, timeout=60) as c:
            results[name] = c.post("/v1/completions", json=body)

    threads = [threading.Thread(target=post, args=("good", good)), threading.Thread(target=post, args=("bad", bad)),
               threading.Thread(target=post, args=("bad stream", {**bad, "stream": True}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["good"].status_code == 200 and results["good"].json()["usage"]["completion_tokens"] == 40
    assert results["bad"].status_code == 500 and "injected failure" in results["bad"].json()["error"]["message"]
    events = [line[6:] for line in results["bad stream"].text.splitlines() if line.startswith("data: ")]
    assert "injected failure" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    assert httpx.get(f"{s.base}/health").status_code == 200
    deadline = time.monotonic() + 10
    while s.state.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    s.state.engine.block_manager.check_whole()


def test_dead_engine_turns_unhealthy_at_once_and_exits_nonzero(model_dir):
    launcher = (str(Path(__file__).with_name("fault_server.py")),)
    p = ServeProcess(model_dir, launcher=launcher).start()
    try:
        with httpx.Client(base_url=p.base, timeout=30) as c:
            assert c.post("/v1/completions", json=NORMAL).status_code == 200
            from tests.serve.fault_server import MARKER_SEED
            r = c.post("/v1/completions", json={**NORMAL, "seed": MARKER_SEED})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            t0 = time.monotonic()
            health, ready = c.get("/health"), c.get("/ready")
            new = c.post("/v1/completions", json=NORMAL)
            assert time.monotonic() - t0 < 1.0  # nobody waits on a dead engine
            assert (health.status_code, ready.status_code, new.status_code) == (503, 503, 503)
        assert p.proc.wait(30) == 1  # drained and exited non-zero: the supervisor restarts it
        assert "engine loop died" in p.proc.stderr.read()
    finally:
        p.stop()
