"""Real-world model directory layouts (tests/hf_layouts.py) end to end: ``LLM(dir)`` and ``cubelm generate`` against
transformers: prompt ids with the tokenizer's special tokens, greedy output equal to transformers' argmax, text
equal to the tokenizer's continuation (streamed and final), chat prompts equal to ``apply_chat_template``, and
generation that stops on every id of ``generation_config.json``'s eos list."""

import json

import pytest
import torch

from cubelm import LLM, SamplingParams
from cubelm.cli import main as cli

transformers = pytest.importorskip("transformers")

LAYOUTS = ("mistral", "llama3", "qwen2")
PROMPTS = ["The capital of France is", "def add(a, b):", "naïve café — 日本語 🎉 party"]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"}]
N = 12


class Case:
    """One layout: its directory, transformers' tokenizer and model, and cubelm's ``LLM`` on the directory."""

    def __init__(self, kind, path):
        self.kind, self.path = kind, path
        self.hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
        self.llm = LLM(str(path), num_blocks=64, block_size=16, log=lambda m: None)
        eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
        self.stop_ids = set(eos) if isinstance(eos, list) else {eos}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronization (ten times slower on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=LAYOUTS)
def case(request, hf_layouts):
    return Case(request.param, hf_layouts[request.param])


@torch.no_grad()
def argmax_tokens(model, ids: list[int], n: int, stop=frozenset()) -> tuple[list[int], int | None]:
    """transformers' greedy choice, one full forward per token: (tokens before a stop id, the stop id or None)."""
    out = []
    for _ in range(n):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token in stop:
            return out, token
        out.append(token)
    return out, None


def continuation(hf_tok, prompt_ids, output_ids, skip=True) -> str:
    before = hf_tok.decode(prompt_ids, skip_special_tokens=skip)
    full = hf_tok.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    assert full.startswith(before)
    return full[len(before):]


def run_streaming(engine, prompt, params) -> tuple[object, list[str]]:
    """Drive the engine step by step like the server does; return the final output and the text after each step."""
    engine.add_request("s", prompt, params)
    texts, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            final = out
    return final, texts


def test_completion_matches_transformers(case):
    greedy = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    outs = case.llm.generate(PROMPTS, greedy, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = case.hf_tok(prompt)["input_ids"]  # with <s> / <|begin_of_text|> where the tokenizer adds it
        assert out.prompt_token_ids == ids
        expected, _ = argmax_tokens(case.hf, ids, N)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == continuation(case.hf_tok, ids, expected)
        final, texts = run_streaming(case.llm.engine, prompt, greedy)
        assert final.outputs[0].text == out.outputs[0].text
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text only ever grows
    if case.kind == "mistral":  # byte-fallback pieces were generated, and still decoded exactly
        assert any(t in case.llm.get_tokenizer().byte_fallback_ids for o in outs for t in o.outputs[0].token_ids)


def test_text_is_exact_wherever_generation_ends(case):
    """Ending after every length 1..N: text held back for an unfinished character (or byte-fallback run) is
    released at the end, so the text is the tokenizer's continuation even when it ends mid-character."""
    prompt = PROMPTS[2]
    ids = case.hf_tok(prompt)["input_ids"]
    expected, _ = argmax_tokens(case.hf, ids, N)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in range(1, N + 1)]
    outs = case.llm.generate([prompt] * N, params, use_tqdm=False)
    for k, out in enumerate(outs, 1):
        assert out.outputs[0].token_ids == expected[:k]
        assert out.outputs[0].text == continuation(case.hf_tok, ids, expected[:k])


def test_chat_prompt_equals_apply_chat_template(case):
    tok = case.llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert ids == case.hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    out = case.llm.generate(ids, SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[0].outputs[0]
    expected, stopped_on = argmax_tokens(case.hf, ids, N, case.stop_ids)
    assert out.token_ids == expected
    assert out.finish_reason == ("stop" if stopped_on is not None else "length")
    assert out.text == continuation(case.hf_tok, ids, expected)


def test_cubelm_generate_prints_the_continuation(case, capsys):
    prompt = PROMPTS[0]
    rc = cli(["generate", "--model", str(case.path), "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", "8", "--ignore-eos"])
    assert rc == 0
    ids = case.hf_tok(prompt)["input_ids"]
    expected, _ = argmax_tokens(case.hf, ids, 8)
    assert capsys.readouterr().out == prompt + continuation(case.hf_tok, ids, expected, skip=False) + "\n"


@torch.no_grad()
def make_eos_win(hf, ids: list[int], eos: int, stop: set[int]) -> tuple[int, float]:
    """An edit of the output head that makes ``eos`` the greedy choice after one or more tokens: its row becomes
    ``scale`` times the row of the ``k``-th greedy token. Returns (k, scale); the model is left unchanged."""
    free, _ = argmax_tokens(hf, ids, 4)
    head = hf.lm_head.weight
    original = head[eos].clone()
    try:
        for k in (2, 3, 1):
            for scale in (1.1, 1.3, 1.6, 2.0):
                head[eos] = scale * head[free[k]]
                out, stopped_on = argmax_tokens(hf, ids, N, stop)
                if stopped_on == eos and out:
                    return free[k], scale
    finally:
        head[eos] = original
    pytest.fail(f"no edit of the output head makes {eos} the greedy choice after a few tokens")


def test_stops_on_every_eos_id(case, tmp_path, capsys):
    from hf_layouts import rewrite_weights

    engine = case.llm.engine
    tok_eos = case.llm.get_tokenizer().eos_token_id
    assert engine.eos_token_ids == case.stop_ids | {tok_eos}
    ids = case.hf_tok(PROMPTS[1])["input_ids"]
    for eos in sorted(case.stop_ids):
        row, scale = make_eos_win(case.hf, ids, eos, case.stop_ids)

        def edit(model, eos=eos, row=row, scale=scale):
            with torch.no_grad():
                model.lm_head.weight[eos] = scale * model.lm_head.weight[row]
        path = rewrite_weights(case.path, tmp_path / str(eos), edit)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
        expected, stopped_on = argmax_tokens(hf, ids, N, case.stop_ids)
        assert stopped_on == eos and expected
        out = LLM(str(path), num_blocks=32, log=lambda m: None).generate(
            PROMPTS[1], SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[0].outputs[0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (expected, "stop", None)
        assert out.text == continuation(case.hf_tok, ids, expected)
        assert cli(["generate", "--model", str(path), "--prompt", PROMPTS[1], "--temperature", "0",
                    "--max-new-tokens", str(N)]) == 0
        printed = capsys.readouterr()
        assert printed.out == PROMPTS[1] + continuation(case.hf_tok, ids, expected, skip=False) + "\n"
        assert f"{len(expected)} tokens" in printed.err and "finish_reason=stop" in printed.err


def test_stop_ids_come_from_generation_config_else_config(tmp_path):
    from cubelm.errors import CubelmError
    from cubelm.model.hf_io import stop_token_ids

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert stop_token_ids(tmp_path, 7) == [5, 7]  # no generation_config.json: config.json's, plus the tokenizer's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 8, 9]}))
    assert stop_token_ids(tmp_path, 8) == [9, 8]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert stop_token_ids(tmp_path, None) == [3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(CubelmError, match="generation_config.json: eos_token_id must be a token id"):
        stop_token_ids(tmp_path)
