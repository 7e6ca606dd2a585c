"""Property-based fuzzing of the OpenAPI document against a live ``cubelm serve`` (schemathesis).

Schema-valid and schema-invalid requests are generated for every route from ``/openapi.json``; each response must
not be a 5xx, must use a status the document lists for that route, and must match its documented body and content
type; schema-invalid requests must be refused (4xx). After the run the engine is still alive and every KV block is
free. The example count is bounded so the test stays in the suite's time budget.
"""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

from tests.serve.conftest import ServeProcess  # noqa: E402

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    # a short context keeps generated max_tokens cheap; a short timeout bounds any one request; an adapter and the
    # runtime LoRA routes, so that they are fuzzed too
    from cubelm.finetune.config import LoraConfig
    from lora_helpers import make_adapter
    adapter = make_adapter(model_dir, tmp_path_factory.mktemp("fuzz") / "a", LoraConfig(r=4), seed=0)
    # /v1/embeddings too, with the same tiny model as the embedder (cubelm's decoder, last-token pooling), and
    # /v1/rag/chat over an index built with that embedder
    index = _rag_index(model_dir, tmp_path_factory.mktemp("fuzz_rag"))
    p = ServeProcess(model_dir, "--max-model-len", "64", "--request-timeout", "20", "--max-n", "4",
                     "--lora-modules", f"fuzz-adapter-0={adapter}", "--enable-runtime-lora",
                     "--embed-model", str(model_dir), "--rag-index", str(index),
                     "--rag-embed-model", str(model_dir)).start()
    yield p
    p.stop()


def _rag_index(model_dir, root):
    from cubelm.rag.embedder import load_embedder
    from cubelm.rag.store import open_store
    emb = load_embedder(str(model_dir))
    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"]
    store = open_store(root / "idx", dim=emb.dim, info={"embedder": emb.name})
    store.add(["a.py:1-2", "b.py:1-2"], emb.encode(texts), texts,
              [{"source": f"{n}.py", "start_line": 1, "end_line": 2} for n in "ab"])
    store.save()
    return root / "idx"


def operations(base: str) -> list:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_never_fails_and_follows_its_document(fuzz_server, mode):
    from schemathesis import GenerationMode
    ops = operations(fuzz_server.base)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                       "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/embeddings",
                                       "/v1/rag/chat", "/v1/rag/chat/completions",
                                       "/v2/health/ready",
                                       "/v2/models/{model_name}", "/v2/models/{model_name}/infer",
                                       "/v2/models/{model_name}/generate", "/v2/models/{model_name}/generate_stream"}
    for op in ops:
        if mode == "negative" and op.method.upper() == "GET":
            continue  # the GET routes take no input: there is nothing to make invalid
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=30)
            assert httpx.get(f"{fuzz_server.base}/health").status_code == 200  # no request may kill the engine

        check()
