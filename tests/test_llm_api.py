"""The offline API (vLLM-shaped): text in, text out, stop strings across token boundaries, per-prompt params."""

import pytest

from cubelm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from helpers import make_tiny_model_dir
    d = make_tiny_model_dir(tmp_path_factory.mktemp("llm"))
    return LLM(str(d), num_blocks=128, log=lambda m: None)


def test_generate_text_in_order_and_matches_token_ids(llm):
    prompts = ["def add(", "class Point", "héllo"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 16 and c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_stop_string_across_token_boundary(llm):
    free = llm.generate("def add(", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    # pick a stop string that starts inside one token and ends inside a later one
    pieces = [tok.decode([t]) for t in free.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1 if len(pieces[1]) > 1 else len(pieces[0]) + len(pieces[1])
    stop = free.text[start:start + 3]
    assert len(stop) == 3
    out = llm.generate("def add(", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.find(stop)]


def test_per_prompt_params_and_seed(llm):
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)]
    a = llm.generate(["class", "def"], params, use_tqdm=False)
    b = llm.generate(["class", "def"], params, use_tqdm=False)
    assert len(a[0].outputs[0].token_ids) == 4 and len(a[1].outputs[0].token_ids) == 8
    assert a[1].outputs[0].token_ids == b[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate(["a", "b", "c"], params, use_tqdm=False)
