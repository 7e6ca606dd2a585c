"""The OpenAI API of a live ``cubelm serve`` process, driven by the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import API_KEY, ServeProcess

EOS_OFF = {"ignore_eos": True}  # a random model may sample EOS at any step; these tests want exact lengths


@pytest.fixture(scope="module")
def server(model_dir):
    p = ServeProcess(model_dir, "--api-key", API_KEY, "--api-key", "sk-other").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["m"]
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/ready").status_code == 200
    assert httpx.get(f"{server.base}/docs").status_code == 200


def test_completion(client):
    r = client.completions.create(model="m", prompt="def add(", max_tokens=8, temperature=0, extra_body=EOS_OFF)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0, extra_body=EOS_OFF)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


@pytest.mark.parametrize("chat", [False, True])
def test_stream_include_usage_matches_non_stream(client, chat):
    kw = dict(model="m", max_tokens=10, temperature=0, extra_body=EOS_OFF)
    if chat:
        kw["messages"] = [{"role": "user", "content": "héllo"}]
        full = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        kw["prompt"] = "class Point"
        full = client.completions.create(**kw).choices[0].text
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # usage chunk comes last
    assert chunks[-2] is finish[0]  # the explicit finish_reason chunk comes right before it


def test_n2_and_batch_of_prompts(client):
    r = client.completions.create(model="m", prompt="def", n=2, max_tokens=5, temperature=1.0, seed=1,
                                  extra_body=EOS_OFF)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 10
    assert r.choices[0].text != r.choices[1].text  # seeds seed+0 and seed+1
    r = client.completions.create(model="m", prompt=["def", "class"], n=2, max_tokens=3, extra_body=EOS_OFF)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2,
                                                 max_tokens=4, stream=True, extra_body=EOS_OFF))
    reasons = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason}
    assert reasons == {0: "length", 1: "length"}


def test_stop_string(client):
    free = client.completions.create(model="m", prompt="def add(", max_tokens=24, temperature=0,
                                     extra_body=EOS_OFF).choices[0].text
    stop = free[5:8]
    assert len(stop) == 3
    for stream in (False, True):
        kw = dict(model="m", prompt="def add(", max_tokens=24, temperature=0, stop=[stop], extra_body=EOS_OFF)
        if stream:
            chunks = list(client.completions.create(**kw, stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            c = client.completions.create(**kw).choices[0]
            text, reason = c.text, c.finish_reason
        assert text == free[:free.find(stop)] and reason == "stop"


def test_seed_reproducible(client):
    kw = dict(model="m", prompt="héllo", max_tokens=12, temperature=1.0, extra_body=EOS_OFF)
    a = client.completions.create(**kw, seed=7).choices[0].text
    b = client.completions.create(**kw, seed=7).choices[0].text
    c = client.completions.create(**kw, seed=8).choices[0].text
    assert a == b and a != c


def test_logprobs(client):
    r = client.completions.create(model="m", prompt="def", max_tokens=3, logprobs=2, extra_body=EOS_OFF)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) >= 1 for t in lp.top_logprobs)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, extra_body=EOS_OFF)
    assert len(r.choices[0].logprobs.content) == 3


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="m", prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.base}/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1},
                   headers={"X-API-Key": "sk-other"})
    assert r.status_code == 200
    assert httpx.get(f"{server.base}/metrics").status_code == 200  # public by default


def test_invalid_parameters_are_400_never_500(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=5000)
    msg = e.value.body["message"]
    assert "1024" in msg and "5000" in msg and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    h = {"Authorization": f"Bearer {API_KEY}"}
    cases = [{"prompt": "x", "temperature": "hot"}, {"prompt": "x", "n": 0}, {"prompt": "x", "top_p": 2},
             {"prompt": "x", "max_tokens": -3}, {}, {"prompt": []}, {"prompt": [99999]}, {"prompt": "x", "echo": True},
             {"prompt": "x", "logprobs": 50}, {"prompt": "x", "stop": [""]}, {"prompt": "x", "stream_options": {}}]
    for body in cases:
        r = httpx.post(f"{server.base}/v1/completions", json=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = httpx.post(f"{server.base}/v1/chat/completions", headers=h, json={"messages": [{"role": "robot",
                                                                                        "content": "x"}]})
    assert r.status_code == 400
    r = httpx.post(f"{server.base}/v1/completions", content=b"{not json", headers={**h, "content-type":
                                                                                       "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_tokenize_detokenize(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(f"{server.base}/tokenize", json={"prompt": "héllo wörld"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 1024
    d = httpx.post(f"{server.base}/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "héllo wörld"
    chat = httpx.post(f"{server.base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=h).json()
    assert chat["count"] > 2


def _scrape(base: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_metrics_parse_and_move(server, client):
    before = _scrape(server.base)
    for name in ("cubelm:num_requests_running", "cubelm:num_requests_waiting", "cubelm:kv_cache_usage_perc",
                 "cubelm:prefix_cache_queries_total", "cubelm:prefix_cache_hits_total",
                 "cubelm:num_preemptions_total", "cubelm:spec_decode_num_draft_tokens_total"):
        assert name in before, name
    client.completions.create(model="m", prompt="def", max_tokens=4, extra_body=EOS_OFF)
    list(client.completions.create(model="m", prompt="def", max_tokens=4, stream=True, extra_body=EOS_OFF))
    after = _scrape(server.base)
    ok = "cubelm:request_success_total{finished_reason=length}"
    assert after[ok] - before.get(ok, 0) == 2
    assert after["cubelm:generation_tokens_total"] - before["cubelm:generation_tokens_total"] == 8
    assert after["cubelm:prompt_tokens_total"] > before["cubelm:prompt_tokens_total"]
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        key = f"cubelm:{h}_count"
        assert after[key] - before.get(key, 0) == 2, h
    assert after["cubelm:inter_token_latency_seconds_count"] - before.get(
        "cubelm:inter_token_latency_seconds_count", 0) == 6
