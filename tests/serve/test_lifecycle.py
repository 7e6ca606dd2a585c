"""Admission and lifecycle: client disconnects free KV blocks, the per-request time limit, the bounded queue, and
the SIGTERM drain of a live ``cubelm serve`` process."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

LONG = {"model": "m", "prompt": "def add(", "max_tokens": 600, "ignore_eos": True}


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def engine_idle(state) -> bool:
    bm = state.engine.block_manager
    return not state.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_blocks(inprocess_server, stream):
    s = inprocess_server()
    bm = s.state.engine.block_manager
    with httpx.Client(timeout=30) as c:
        if stream:
            with c.stream("POST", f"{s.base}/v1/completions", json={**LONG, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # generation is under way
                assert bm.num_free_blocks < bm.num_blocks
            # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(f"{s.base}/v1/completions", json=LONG, timeout=0.5)
    assert wait_for(lambda: engine_idle(s.state)), f"{bm.num_blocks - bm.num_free_blocks} blocks still held"
    bm.check_whole()
    assert s.state.llm.num_unfinished == 0
    gen = s.state.engine.num_generated_tokens
    time.sleep(0.3)
    assert s.state.engine.num_generated_tokens == gen  # nothing keeps generating for a client that is gone


def test_request_timeout_aborts_with_clear_error(inprocess_server):
    s = inprocess_server(request_timeout=0.4)
    client = openai.OpenAI(base_url=f"{s.base}/v1", api_key="none", max_retries=0)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="m", prompt="def add(", max_tokens=600, extra_body={"ignore_eos": True})
    assert e.value.status_code == 504 and time.monotonic() - t0 < 10
    assert "time limit of 0.4 s" in e.value.body["message"] and e.value.body["code"] == "request_timeout"
    with pytest.raises(openai.APIError, match="time limit"):  # in-band error event in a stream
        list(client.completions.create(model="m", prompt="def", max_tokens=600, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert wait_for(lambda: engine_idle(s.state))
    s.state.engine.block_manager.check_whole()


def test_full_queue_is_503(inprocess_server):
    s = inprocess_server(max_pending_requests=1)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{s.base}/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()  # NOTE: keep a reference: a dropped iterator closes the stream (a disconnect)
            next(lines)
            busy = c.post(f"{s.base}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
    assert wait_for(lambda: engine_idle(s.state))
    ok = httpx.post(f"{s.base}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_sigterm_drains_stream_then_exits_zero(serve_process):
    p = serve_process("--shutdown-timeout", "60")
    events: list[str] = []

    def consume():
        with httpx.stream("POST", f"{p.base}/v1/completions", timeout=60,
                          json={"model": "m", "prompt": "def add(", "max_tokens": 150, "ignore_eos": True,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)

    t = threading.Thread(target=consume)
    t.start()
    assert wait_for(lambda: len(events) >= 2, 30)
    p.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(f"{p.base}/ready").status_code == 503, 5)
    refused = httpx.post(f"{p.base}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    t.join(60)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "error" not in json.dumps(chunks)
    assert p.proc.wait(30) == 0
    assert "draining" in p.proc.stderr.read()
