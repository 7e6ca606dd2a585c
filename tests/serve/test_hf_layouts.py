"""``cubelm serve --model DIR`` on real-world layouts (Mistral-, Llama-3- and Qwen2-style directories from
tests/hf_layouts.py): chat prompts are the chat template's tokens (``usage.prompt_tokens`` equals the length of
transformers' ``apply_chat_template(..., add_generation_prompt=True)``), completions get the tokenizer's special
tokens, and a template's ``raise_exception`` is a 400 carrying its message."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import ServeProcess

transformers = pytest.importorskip("transformers")

LAYOUTS = ("mistral", "llama3", "qwen2")
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def servers(hf_layouts):
    procs = {kind: ServeProcess(hf_layouts[kind]) for kind in LAYOUTS}  # the three load side by side
    try:
        yield {kind: p.start().base for kind, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


@pytest.mark.parametrize("kind", LAYOUTS)
def test_prompt_tokens_are_the_tokenizers(servers, hf_layouts, kind):
    base, hf = servers[kind], transformers.AutoTokenizer.from_pretrained(str(hf_layouts[kind]))
    chat_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                   json={"model": "m", "messages": CHAT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(chat_ids)
    r = httpx.post(f"{base}/tokenize", json={"messages": CHAT}, timeout=60)
    assert r.json()["tokens"] == chat_ids
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": "m", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(hf(PROMPT)["input_ids"])
    assert httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}, timeout=60).json()["tokens"] == \
        hf(PROMPT)["input_ids"]


def test_template_exception_is_a_400_with_its_message(servers):
    r = httpx.post(f"{servers['mistral']}/v1/chat/completions", timeout=60,
                   json={"model": "m", "messages": [{"role": "user", "content": "a"},
                                                    {"role": "user", "content": "b"}]})
    assert r.status_code == 400
    assert "Conversation roles must alternate" in r.json()["error"]["message"]
