"""Tokenizer: exact round trip, special-token ids, offsets, and transformers.AutoTokenizer as the reference for
loading, encoding, decoding and the chat template. The tokenizer is trained inside the test (small vocab)."""

import json

import pytest

from cubelm.data.tokenizer import (CHAT_TEMPLATE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, TokenizerConfig, load_tokenizer,
                                   render_chat, token_stats, train_tokenizer)
from cubelm.errors import CubelmError

CORPUS = [
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x, self.y = x, y\n",
    "# Ünïcödé comment: naïve café, 日本語, emoji 🎉\nprint('héllo wörld')\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
] * 30

ROUND_TRIP = [
    "",
    "    indented\n\t\ttabs   and   spaces  \n\n\n",
    "def f(x):\n    return x ** 2  # square\r\n",
    "naïve café — “quotes” 日本語 🎉🐍 \u00e9 vs e\u0301",
    "trailing space ",
    "\x00\x07 control characters survive byte-level BPE",
    "<|user|>special tokens in text<|eos|>",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, TokenizerConfig(vocab_size=320, model_max_length=512)).save(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_round_trip_is_exact(tok_dir):
    tok = load_tokenizer(tok_dir)
    for text in ROUND_TRIP + CORPUS[:4]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_ids_0_to_5(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.encode("<|eos|>") == [1]
    assert tok.vocab_size == 320


def test_offsets_map_tokens_back_to_text(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "def add(a, b):\n    return a + b  # sum\n"
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert "".join(text[s:e] for s, e in offsets) == text  # ASCII: spans tile the text
    for token_id, (s, e) in zip(ids, offsets):
        assert tok.decode([token_id]) == text[s:e]


def test_autotokenizer_loads_and_matches(tok_dir, hf):
    tok = load_tokenizer(tok_dir)
    for text in ROUND_TRIP + CORPUS[:4]:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids  # no BOS/EOS added implicitly, same ids
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 512
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == CHAT_TEMPLATE


def test_chat_template_renders_two_turn_conversation(tok_dir, hf):
    tok = load_tokenizer(tok_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    expected = ("<|system|>Be brief.<|eos|><|user|>What is 2+2?<|eos|><|assistant|>4<|eos|>"
                "<|user|>And 3+3?<|eos|><|assistant|>6<|eos|>")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert hf.apply_chat_template(messages, tokenize=False) == expected
    prompt = messages[:4]
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(prompt) == render_chat(prompt)
    assert tok.apply_chat_template(prompt).endswith("<|eos|><|assistant|>")
    ids = tok.encode(tok.apply_chat_template(prompt))
    assert ids.count(tok.role_token_ids["user"]) == 2 and ids[-1] == tok.role_token_ids["assistant"]


def test_training_is_deterministic():
    a = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=300))
    b = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=300))
    assert a.sha256 == b.sha256


def test_vocab_too_small_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(CubelmError, match="too small"):
        TokenizerConfig(vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(CubelmError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(CubelmError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])


def test_token_stats():
    stats = token_stats([10, 20, 30, 1000], num_chars=3180, context=64)
    assert stats["chars_per_token"] == 3.0
    assert stats["tokens_per_document"] == {"p50": 25, "p95": 854, "max": 1000}
    assert stats["fit_context"] == 3
