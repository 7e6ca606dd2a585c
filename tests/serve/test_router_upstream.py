"""The router's upstream client (``cubelm.serve.upstream``) against a scripted service (httpx's MockTransport): which
failures are retried, and the status and OpenAI error each one becomes. The three-process graph is
tests/serve/test_inference_graph.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cubelm.serve.errors import APIError
from cubelm.serve.router import RouterMetrics, rag_k, split_messages
from cubelm.serve.upstream import Upstream


def upstream(handler, retries: int = 2) -> tuple[Upstream, RouterMetrics]:
    metrics = RouterMetrics()
    return Upstream("LLM", "http://llm:8000", api_key=None, timeout=5, connect_timeout=1, retries=retries,
                    metrics=metrics, transport=httpx.MockTransport(handler)), metrics


def send(up: Upstream, **kw):
    async def go():
        try:
            return await up.send("POST", "/v1/chat/completions", hop="llm", json_body={"x": 1}, **kw)
        finally:
            await up.aclose()
    return asyncio.run(go())


def count(metrics: RouterMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_connection_refused_is_retried_then_a_502():
    calls = []

    def refuse(request):
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    up, metrics = upstream(refuse)
    with pytest.raises(APIError) as e:
        send(up)
    assert len(calls) == 3 and e.value.status == 502 and e.value.code == "upstream_unreachable"
    assert "LLM service at http://llm:8000 is unreachable" in e.value.message and "3 attempts" in e.value.message
    assert count(metrics, "cubelm:router_hop_retries_total", hop="llm") == 2
    assert count(metrics, "cubelm:router_hop_requests_total", hop="llm", outcome="unreachable") == 1


def test_a_connect_failure_then_success_is_one_ok_call():
    calls = []

    def flaky(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    up, metrics = upstream(flaky)
    assert send(up).json() == {"ok": True} and len(calls) == 2
    assert count(metrics, "cubelm:router_hop_requests_total", hop="llm", outcome="ok") == 1


def test_a_request_the_service_received_is_never_sent_twice():
    calls = []

    def slow(request):
        calls.append(request)
        raise httpx.ReadTimeout("timed out", request=request)

    up, metrics = upstream(slow)
    with pytest.raises(APIError) as e:
        send(up)
    assert len(calls) == 1 and e.value.status == 504 and e.value.code == "upstream_timeout"
    assert count(metrics, "cubelm:router_hop_requests_total", hop="llm", outcome="timeout") == 1


@pytest.mark.parametrize("status, body, expected, code", [
    (503, {"error": {"message": "the server is draining"}}, 503, "upstream_unavailable"),
    (500, {"error": {"message": "internal server error (KeyError)"}}, 502, "upstream_error"),
    (502, b"<html>bad gateway</html>", 502, "upstream_error"),
    (400, {"error": {"message": "temperature must be >= 0"}}, 400, "upstream_rejected"),
    (401, {"error": {"message": "incorrect API key provided"}}, 401, "upstream_rejected"),
])
def test_error_statuses_become_the_routers(status, body, expected, code):
    def answer(request):
        content = body if isinstance(body, bytes) else None
        return httpx.Response(status, json=None if content else body, content=content,
                              headers={"Retry-After": "3"} if status == 503 else None)

    up, _ = upstream(answer)
    with pytest.raises(APIError) as e:
        send(up)
    assert e.value.status == expected and e.value.code == code
    assert e.value.message.startswith(f"the LLM service answered {status}: ")
    message = body.decode() if isinstance(body, bytes) else body["error"]["message"]
    assert message in e.value.message
    assert e.value.headers == ({"Retry-After": "3"} if status == 503 else {})


def test_the_key_sent_upstream():
    seen = []

    def record(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={})

    up, _ = upstream(record)
    send(up, auth="Bearer client-key")  # no key of its own: the client's passes through
    up, _ = upstream(record)
    up.api_key = "router-key"
    send(up, auth="Bearer client-key")
    assert seen == ["Bearer client-key", "Bearer router-key"]


def test_split_messages_keeps_the_grounding_instruction_and_the_turns():
    from cubelm.rag.prompt import DEFAULT_SYSTEM
    q, system, history = split_messages([
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "salut"}]},
        {"role": "user", "content": "What is X?"}])
    assert q == "What is X?" and system == DEFAULT_SYSTEM + "\n\nAnswer in French."
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"}]
    assert split_messages([{"role": "user", "content": "q"}]) == ("q", None, [])
    assert rag_k(None, 4) == 4 and rag_k({"k": 7}, 4) == 7
    for bad in ({"k": True}, {"k": 101}, [3]):
        with pytest.raises(APIError):
            rag_k(bad, 4)
