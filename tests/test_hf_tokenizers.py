"""Foreign tokenizers (Mistral-, Llama-3- and Qwen2-style directories from tests/hf_layouts.py) against
transformers' AutoTokenizer: ids, special tokens, decoding, chat templates and where they come from, template
errors, missing files; and incremental detokenization as a property over random id sequences."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cubelm.data.tokenizer import CHAT_TEMPLATE, TokenizerConfig, load_tokenizer, render_chat, train_tokenizer
from cubelm.engine.detokenize import IncrementalDetokenizer
from cubelm.errors import CubelmError

transformers = pytest.importorskip("transformers")

LAYOUTS = ("mistral", "llama3", "qwen2")
TEXTS = ["Hello world", " leading space", "  two  spaces ", "naïve café straße “quoted” — 日本語 🎉",
         "def add(a, b):\n\treturn a + b\n\n", "<s>[INST] hi [/INST]", "<|im_start|>user\nhi<|im_end|>",
         "<|begin_of_text|>x<|eot_id|>", "<tool_call>{\"a\": 1}</tool_call>", "e\u0301 vs \u00e9", "", "12345 67"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Tell me a joke.  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "naïve 🎉?"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request, hf_layouts):
    """(layout name, directory, cubelm tokenizer, transformers tokenizer)."""
    d = hf_layouts[request.param]
    return request.param, d, load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))


def chats_for(kind: str) -> list[list[dict]]:
    # the Mistral template refuses system messages (tested below as an error)
    return [c for c in CHATS if kind != "mistral" or c[0]["role"] != "system"]


def test_ids_special_tokens_and_decode_match_transformers(pair):
    kind, _, tok, hf = pair
    assert tok.vocab_size == len(hf)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                      hf.pad_token_id)
    assert tok.special_tokens == hf.special_tokens_map
    for text in TEXTS:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf(text, add_special_tokens=add)["input_ids"], text
        ids = tok.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.encode_batch(TEXTS, add_special_tokens=True) == [hf(t)["input_ids"] for t in TEXTS]
    ids = tok.encode("a Paris is big", add_special_tokens=False)  # logprob entries: each token's text in context
    assert "".join(tok.token_text(t) for t in ids[1:]) == hf.decode(ids)[len(hf.decode(ids[:1])):] == " Paris is big"
    first = tok.encode("Hello", add_special_tokens=True)[0]
    assert (first == tok.bos_token_id) == (kind != "qwen2")  # <s> / <|begin_of_text|> from the post-processor
    assert bool(tok.byte_fallback_ids) == (kind == "mistral")


def test_chat_template_matches_apply_chat_template(pair):
    kind, _, tok, hf = pair
    for chat in chats_for(kind):
        for gen in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(text) == hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
    if kind != "mistral":  # templates with tool definitions, and extra template variables
        chat = [{"role": "user", "content": "Weather in Paris?"}]
        assert tok.apply_chat_template(chat, tools=TOOLS) == hf.apply_chat_template(
            chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat, date_string="1 Jan 2030") == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2030")
        calls = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "sunny"}]
        assert tok.apply_chat_template(calls, tools=TOOLS) == hf.apply_chat_template(
            calls, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_template_errors_are_cubelm_errors_with_the_templates_message(hf_layouts):
    tok = load_tokenizer(hf_layouts["mistral"])
    with pytest.raises(CubelmError, match="Only user and assistant roles are supported!"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(CubelmError, match="Conversation roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(CubelmError, match="does not parse"):
        tok.apply_chat_template(hi, chat_template="{% for m in messages %}{{ m.content }")
    with pytest.raises(CubelmError, match="unsafe"):  # the sandbox holds
        tok.apply_chat_template(hi, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(CubelmError, match="_x"):
        tok.apply_chat_template(hi, chat_template="{% set ns = namespace(_x=1) %}{{ ns._x }}")
    # loop controls, tojson without HTML escaping, trim_blocks/lstrip_blocks, as transformers sets them up
    template = ("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
                "{{ m | tojson }}|{{ dict(a='<&>') | tojson(indent=1) }}\n{% endfor %}")
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_layouts["mistral"]))
    two = hi + [{"role": "assistant", "content": "<b>"}]
    assert tok.apply_chat_template(two, chat_template=template) == hf.apply_chat_template(
        two, chat_template=template, tokenize=False, add_generation_prompt=True)


def _tokenizer_dir(src, dst, config_edit=None, files: dict | None = None):
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(text)
    return dst


def test_chat_template_sources_match_transformers(hf_layouts, tmp_path):
    src, chat = hf_layouts["llama3"], CHATS[0]
    named = [{"name": "default", "template": "D:{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T:{{ (tools or []) | length }}:{{ messages[0].content }}"}]

    def both(d, **kw):
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        ours = load_tokenizer(d).apply_chat_template(chat, **kw)
        assert ours == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kw)
        return ours

    d = _tokenizer_dir(src, tmp_path / "named", lambda c: c.update(chat_template=named))
    assert both(d) == "D:What is the capital of France?"
    assert both(d, tools=TOOLS) == "T:1:What is the capital of France?"
    assert both(d, chat_template="tool_use").startswith("T:0:")
    d = _tokenizer_dir(src, tmp_path / "jinja", files={"chat_template.jinja": "J:{{ bos_token }}",
                                                       "additional_chat_templates/short.jinja": "S"})
    assert both(d) == "J:<|begin_of_text|>"  # the .jinja file wins over tokenizer_config.json's template
    assert both(d, chat_template="short") == "S"
    d = _tokenizer_dir(src, tmp_path / "none", lambda c: c.pop("chat_template"))
    with pytest.raises(CubelmError, match="no chat template"):
        load_tokenizer(d).apply_chat_template(chat)
    d = _tokenizer_dir(src, tmp_path / "nodefault", lambda c: c.update(chat_template=named[1:]))
    with pytest.raises(CubelmError, match="tool_use"):
        load_tokenizer(d).apply_chat_template(chat)


def test_special_tokens_map_and_add_bos_token(hf_layouts, tmp_path):
    src = hf_layouts["mistral"]

    def legacy(c):  # an older layout: no added_tokens_decoder, so special_tokens_map.json is read and wins
        del c["added_tokens_decoder"]
        c["eos_token"] = "<unk>"
    d = _tokenizer_dir(src, tmp_path / "legacy", legacy)
    shutil.copy(src / "special_tokens_map.json", d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = load_tokenizer(d)
    assert tok.special_tokens == hf.special_tokens_map and tok.eos_token_id == hf.eos_token_id == 2
    # the post-processor decides which tokens a prompt gets, not add_bos_token (transformers 5 does the same)
    d = _tokenizer_dir(src, tmp_path / "post", lambda c: c.update(add_bos_token=False))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert load_tokenizer(d).encode("Hello", add_special_tokens=True) == hf("Hello")["input_ids"]
    assert hf("Hello")["input_ids"][0] == 1
    # without a post-processor, tokenizer_config.json's add_bos_token/add_eos_token apply (as in transformers 4;
    # transformers 5 ignores them when there is a tokenizer.json)
    data = json.loads((src / "tokenizer.json").read_text())
    data["post_processor"] = None
    d = _tokenizer_dir(src, tmp_path / "nopost", lambda c: c.update(add_eos_token=True))
    (d / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer(d)
    plain = tok.encode("Hello")
    assert tok.encode("Hello", add_special_tokens=True) == [1, *plain, 2]
    assert tok.encode_batch(["Hello"], add_special_tokens=True) == [[1, *plain, 2]]


def test_missing_or_broken_tokenizer_files_say_what_is_wrong(hf_layouts, tmp_path):
    with pytest.raises(CubelmError, match="no tokenizer.json.*tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(CubelmError, match="tokenizer.model .a SentencePiece model.*save_pretrained"):
        load_tokenizer(tmp_path)
    model_dir = tmp_path / "model"
    shutil.copytree(hf_layouts["qwen2"], model_dir)
    (model_dir / "tokenizer.json").unlink()
    from cubelm import LLM
    with pytest.raises(CubelmError, match="no tokenizer.json in .*model"):
        LLM(str(model_dir), num_blocks=8, log=lambda m: None)
    d = _tokenizer_dir(hf_layouts["qwen2"], tmp_path / "bad")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CubelmError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(d)


def test_cubelm_tokenizer_is_one_more_hf_tokenizer(tmp_path):
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "héllo wörld"] * 20, TokenizerConfig(vocab_size=300))
    tok.save(tmp_path)
    loaded, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for t in (tok, loaded):
        assert t.is_cubelm and t.chat_template == CHAT_TEMPLATE
        assert t.special_tokens == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        assert t.encode("def f(x):", add_special_tokens=True) == t.encode("def f(x):") == hf("def f(x):")["input_ids"]
    chat = CHATS[2]
    assert loaded.apply_chat_template(chat) == render_chat(chat) == hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    # the Jinja path renders cubelm's template to the same text as render_chat
    assert loaded.apply_chat_template(chat, chat_template=CHAT_TEMPLATE + " ") == render_chat(chat) + " "


# ---- incremental detokenization ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detok_tokenizers(hf_layouts):
    toks = {kind: load_tokenizer(hf_layouts[kind]) for kind in LAYOUTS}
    toks["cubelm"] = train_tokenizer(["héllo wörld ✓ 日本語 def f(x): return x"] * 20,
                                     TokenizerConfig(vocab_size=300))
    return toks


def id_strategy(tok):
    """Random ids weighted towards the hard cases: byte-fallback pieces, special tokens, pieces of multi-byte
    characters, ids past the tokenizer's vocabulary (a model's padded rows)."""
    texty = tok.encode("naïve café — 日本語 🎉 hello world\n\tdef x")
    parts = [st.sampled_from(texty), st.sampled_from(sorted(tok.special_ids)), st.integers(0, tok.vocab_size - 1),
             st.integers(tok.vocab_size, tok.vocab_size + 3)]
    if tok.byte_fallback_ids:
        parts.append(st.sampled_from(sorted(tok.byte_fallback_ids)))
    return st.one_of(parts)


@pytest.mark.parametrize("kind", [*LAYOUTS, "cubelm"])
def test_incremental_detokenization_equals_full_decode(detok_tokenizers, kind):
    tok = detok_tokenizers[kind]
    ids = id_strategy(tok)

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(prompt=st.lists(ids, min_size=1, max_size=12), output=st.lists(ids, min_size=1, max_size=16),
           skip=st.booleans())
    def check(prompt, output, skip):
        full = tok.decode(prompt + output, skip_special_tokens=skip)
        before = tok.decode(prompt, skip_special_tokens=skip)
        detok = IncrementalDetokenizer.for_tokenizer(tok, prompt, skip_special_tokens=skip)
        deltas = [detok.add(t) for t in output]
        streamed = "".join(deltas) + detok.flush()
        if full.startswith(before):  # else the prompt ends inside a character the output completes: no difference
            assert streamed == full[len(before):]
        assert not any(d.endswith("\ufffd") for d in deltas)  # unfinished characters wait for their last byte

    check()


@pytest.mark.parametrize("kind", ("cubelm", *LAYOUTS))
def test_token_bytes_add_up_to_the_texts_bytes(kind, hf_layouts):
    """Bits per byte divides by these: each token's own bytes, partial characters included (a lone decode would
    count U+FFFD, 3 bytes, for each piece of a split character)."""
    if kind == "cubelm":
        tok = train_tokenizer(TEXTS * 20, TokenizerConfig(vocab_size=300))
    else:
        tok = load_tokenizer(hf_layouts[kind])
    for text in [t for t in TEXTS if "<" not in t]:  # special-token literals stand for no text
        ids = tok.encode(text)
        # SentencePiece prepends one "▁" (its dummy prefix) to a text that does not start with a space
        extra = 1 if kind == "mistral" and text and not text.startswith(" ") else 0
        normalizer = tok.backend.normalizer  # Qwen2's NFC makes e + U+0301 one 2-byte é
        text = normalizer.normalize_str(text) if normalizer is not None else text
        assert sum(tok.token_num_bytes(i) for i in ids) == len(text.encode()) + extra, text
    assert tok.token_num_bytes(tok.eos_token_id) == 0
