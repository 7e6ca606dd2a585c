"""Fine-tuning data: answer masks against transformers' rendering of real chat templates, row shapes, skipped rows,
the held-out split by module, and batches whose padding does not change the loss."""

import json

import numpy as np
import pytest
import torch

from cubelm.data.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from cubelm.errors import CubelmError
from cubelm.finetune.batches import ExampleSampler
from cubelm.finetune.data import build_instruct_data, iter_rows
from cubelm.finetune.render import Conversation, RowError, fit, parse_row, tokenize
from cubelm.train.batches import IGNORE_INDEX

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."}]
MULTI = [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "Hello! How are you?"},
         {"role": "user", "content": "What is the capital of Italy?"}, {"role": "assistant", "content": "Rome."}]
END_OF_TURN = {"mistral": "</s>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = ["def add(a, b):\n    return a + b\n", "Add the numbers and answer briefly.", "hello world"] * 40
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, TokenizerConfig(vocab_size=300)).save(path)
    return load_tokenizer(path)


def _hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _answers(tokenizer, example) -> str:
    return tokenizer.decode(example.ids[example.mask == 1].tolist())


@pytest.mark.parametrize("kind", ["mistral", "llama3", "qwen2"])
def test_answer_mask_matches_transformers_rendering(hf_layouts, kind):
    """The unmasked prefix is exactly what transformers feeds the model as the prompt; the targets are the answer
    and its end-of-turn token, nothing the template writes after it."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_layouts[kind])
    messages = CHAT[1:] if kind == "mistral" else CHAT  # Mistral's template has no system role
    ex = tokenize(Conversation(messages=tuple(messages)), load_tokenizer(hf_layouts[kind]))
    assert ex.ids[:ex.prompt_len].tolist() == _hf_ids(hf, messages[:-1], add_generation_prompt=True)
    assert ex.ids.tolist() == _hf_ids(hf, messages)[:len(ex.ids)]
    assert hf.decode(ex.ids[ex.mask == 1].tolist()).strip() == messages[-1]["content"] + END_OF_TURN[kind]
    assert ex.mask[ex.prompt_len:].all()  # one contiguous answer


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_every_assistant_turn_is_learned(hf_layouts, kind):
    ex = tokenize(Conversation(messages=tuple(MULTI)), load_tokenizer(hf_layouts[kind]))
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_layouts[kind])
    eot = END_OF_TURN[kind]
    assert hf.decode(ex.ids[ex.mask == 1].tolist()) == f"Hello! How are you?{eot}Rome.{eot}"


def test_cubelm_template_alpaca_and_plain_rows(tok):
    alpaca = tokenize(parse_row({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}), tok)
    assert tok.decode(alpaca.ids[:alpaca.prompt_len].tolist()) == "<|user|>Add the numbers.\n\n2 3<|eos|><|assistant|>"
    assert _answers(tok, alpaca) == "5<|eos|>"
    plain = tokenize(parse_row({"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}), tok)
    assert tok.decode(plain.ids.tolist()) == "def add(a, b):\n    return a + b\n<|eos|>"  # no template, EOS added
    assert _answers(tok, plain) == "    return a + b\n<|eos|>"
    conversational = parse_row({"prompt": CHAT[:2], "completion": CHAT[2:]})  # trl's conversational shape
    assert conversational.messages == tuple(CHAT)


def test_template_without_a_closing_special_token_gets_eos(tok):
    saved, tok.chat_template = tok.chat_template, (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    try:
        ex = tokenize(parse_row({"messages": CHAT[1:]}), tok)
    finally:
        tok.chat_template = saved
    assert _answers(tok, ex) == "Paris is the capital.\n<|eos|>"


@pytest.mark.parametrize("record,reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_final_answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty_answer"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "bad_messages"),
    ({"instruction": "", "output": "x"}, "bad_fields"),
    ({"prompt": "a", "completion": ""}, "empty_answer"),
    ({"text": "just text"}, "unknown_shape"),
    ([1, 2], "not_an_object"),
])
def test_unusable_rows_name_their_reason(record, reason):
    with pytest.raises(RowError) as e:
        parse_row(record)
    assert e.value.reason == reason


def test_a_role_the_template_refuses_is_a_template_error(tok):
    row = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(RowError, match="template_error"):
        tokenize(parse_row(row), tok)


def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_report_counts_skipped_long_and_truncated_rows(tok, tmp_path):
    good = [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(20)]
    long = {"prompt": "hello world " * 5, "completion": "def add(a, b): " * 60}
    rows = good + [long, "{not json", {"text": "x"}, {"prompt": "p", "completion": ""}]
    src = _write_rows(tmp_path / "rows.jsonl", rows)
    data = build_instruct_data(src, tok, max_len=64, val_fraction=0.2)
    r = data.report
    assert r.rows == 24 and dict(r.skipped) == {"too_long": 1, "bad_json": 1, "unknown_shape": 1, "empty_answer": 1}
    assert r.train_examples + r.val_examples == 20 and r.val_examples >= 1
    cut = build_instruct_data(src, tok, max_len=64, val_fraction=0.2, truncate=True)
    assert cut.report.truncated == 1 and "too_long" not in cut.report.skipped
    assert max(len(e.ids) for e in cut.train + cut.val) == 64


def test_no_usable_rows_and_missing_template_are_errors(tok, tmp_path):
    src = _write_rows(tmp_path / "bad.jsonl", [{"text": "a"}, "{oops", {"prompt": "p", "completion": " "}])
    with pytest.raises(CubelmError, match="no usable rows.*3 read"):
        build_instruct_data(src, tok, max_len=64, val_fraction=0.1)
    chat = _write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(CubelmError, match="has none"):
            build_instruct_data(chat, tok, max_len=64, val_fraction=0.1)
    finally:
        tok.chat_template = saved


def test_stdlib_instruct_holds_out_whole_modules(tok):
    source = "stdlib-instruct:json,html"
    data = build_instruct_data(source, tok, max_len=10**6, val_fraction=0.3)
    held = set(data.report.val_groups)
    modules = [group for _, group, _ in iter_rows(source)]
    assert held and held < set(modules)
    assert data.report.val_examples == sum(m in held for m in modules)  # every example of a held-out module
    assert data.report.train_examples == sum(m not in held for m in modules)
    again = build_instruct_data(source, tok, max_len=10**6, val_fraction=0.3)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(data.train, again.train))


def test_padding_does_not_change_the_loss(tok):
    """A padded micro-batch gives each example the loss it has alone (causal attention; pads come last)."""
    from cubelm.model.config import ModelConfig
    from cubelm.model.transformer import build_model
    from cubelm.train.loop import lm_loss
    examples = [tokenize(parse_row({"instruction": "Add the numbers." * k, "output": "5" * (3 * k)}), tok)
                for k in (1, 4, 2)]
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4), seed=0)
    sampler = ExampleSampler(examples, pad_id=0, shuffle=False)
    x, y = sampler.batch(0, 3)
    assert x.shape[1] == max(len(e.ids) for e in examples) - 1 and (y != IGNORE_INDEX).sum() == sum(
        int(e.mask[1:].sum()) for e in examples)
    with torch.no_grad():
        batched = lm_loss(model(x), y, reduction="sum")
        alone = sum(lm_loss(model(xi), yi, reduction="sum") for xi, yi in (sampler.batch(i, 1) for i in range(3)))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_validation_sampler_visits_each_example_once(tok):
    examples = [tokenize(parse_row({"prompt": "p" * k, "completion": "c"}), tok) for k in range(1, 6)]
    sampler = ExampleSampler(examples, pad_id=0, shuffle=False, wrap=False)
    targets = sum(int((sampler.batch(i * 2, 2)[1] != IGNORE_INDEX).sum()) for i in range(3))  # 6 rows, 5 examples
    assert targets == sum(int(e.mask[1:].sum()) for e in examples)
    train = ExampleSampler(examples, pad_id=0, seed=3)
    first_epoch = sorted(train.index(i) for i in range(5))
    assert first_epoch == list(range(5)) and [train.index(i) for i in range(5, 10)] != first_epoch


def test_fit_keeps_a_cut_answer_only_when_asked(tok):
    ex = tokenize(parse_row({"prompt": "hello", "completion": "world " * 20}), tok)
    with pytest.raises(RowError, match="too_long"):
        fit(ex, 8, truncate=False)
    assert len(fit(ex, 8, truncate=True).ids) == 8
