"""Fault isolation in the engine: a request that fails fails alone; a failed forward fails only its batch; repeated
forward failures mark the engine broken; a dead async loop refuses new work at once instead of hanging it."""

import asyncio

import pytest

from cubelm.engine.async_engine import AsyncLLM, EngineDead
from cubelm.engine.config import EngineConfig
from cubelm.engine.llm_engine import MAX_FAILED_STEPS, EngineBroken, LLMEngine
from cubelm.engine.outputs import OutputAccumulator
from cubelm.engine.params import SamplingParams
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8], "b": [9, 10, 11], "c": [12, 13, 14, 15, 16]}


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1)
    return build_model(cfg, seed=3).eval()


def new_engine(model) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=4), log=lambda m: None)


def run_all(engine, prompts=PROMPTS, params=GREEDY) -> dict:
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    acc = {rid: OutputAccumulator() for rid in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            acc[out.request_id].add(out)
    return {rid: a.build() for rid, a in acc.items()}


def test_a_request_failing_in_postprocessing_fails_alone(model, monkeypatch):
    expected = run_all(new_engine(model))
    engine = new_engine(model)
    original = LLMEngine._append_token

    def append_token(self, seq, token, lp, now):
        if seq.request_id == "b" and seq.num_output_tokens == 3:
            raise RuntimeError("boom")
        return original(self, seq, token, lp, now)

    monkeypatch.setattr(LLMEngine, "_append_token", append_token)
    outs = run_all(engine)
    assert outs["b"].error == "RuntimeError: boom" and outs["b"].outputs[0].finish_reason == "error"
    for rid in ("a", "c"):  # the requests that shared every batch with it are untouched
        assert outs[rid].error is None and outs[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids
    engine.block_manager.check_whole()


def test_sampler_failure_is_narrowed_to_its_row(model, monkeypatch):
    expected = run_all(new_engine(model))
    import cubelm.engine.llm_engine as llm_engine
    original = llm_engine.sample_batch

    def sample_batch(logits, seqs, generator=None):
        if any(s.request_id == "c" and s.num_output_tokens == 5 for s in seqs):
            raise RuntimeError("sampler exploded")
        return original(logits, seqs, generator)

    monkeypatch.setattr(llm_engine, "sample_batch", sample_batch)
    engine = new_engine(model)
    outs = run_all(engine)
    assert "sampler exploded" in outs["c"].error and len(outs["c"].outputs[0].token_ids) == 5
    assert [outs[r].outputs[0].token_ids for r in "ab"] == [expected[r].outputs[0].token_ids for r in "ab"]
    engine.block_manager.check_whole()


def test_failed_forward_fails_its_batch_then_the_engine_goes_on(model, monkeypatch):
    engine = new_engine(model)
    original = engine.runner.run
    calls = {"n": 0}

    def run(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("forward failed")
        return original(*args, **kw)

    monkeypatch.setattr(engine.runner, "run", run)
    outs = run_all(engine)
    assert all(o.outputs[0].finish_reason == "error" for o in outs.values())  # all three shared that batch
    engine.block_manager.check_whole()
    later = run_all(engine, {"d": [5, 6, 7]})  # the engine still serves
    assert later["d"].error is None and len(later["d"].outputs[0].token_ids) == 12


def test_repeated_forward_failures_mark_the_engine_broken(model, monkeypatch):
    engine = new_engine(model)

    def run(*args, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", run)
    for i in range(MAX_FAILED_STEPS - 1):
        engine.add_request(str(i), [5, 6, 7], GREEDY)
        assert engine.step()[0].error == "RuntimeError: device lost"
    engine.add_request("last", [5, 6, 7], GREEDY)
    with pytest.raises(EngineBroken, match="device lost"):
        engine.step()


def test_dead_loop_fails_streams_and_refuses_new_work(model, monkeypatch):
    engine = new_engine(model)
    llm = AsyncLLM(engine)

    def step():
        raise SystemError("loop bug")

    async def main():
        monkeypatch.setattr(engine, "step", step)
        with pytest.raises(EngineDead, match="loop bug"):
            async for _ in llm.generate([5, 6, 7], GREEDY):
                pass
        with pytest.raises(EngineDead):
            llm.submit([5, 6, 7], GREEDY, "after")

    try:
        asyncio.run(main())
        assert isinstance(llm.error, SystemError)
    finally:
        llm.shutdown()


def test_delta_outputs_join_to_the_final_output(model):
    final = run_all(new_engine(model), params=SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=2))
    delta = run_all(new_engine(model), params=SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=2,
                                                             output_kind="delta"))
    for rid in PROMPTS:
        a, b = final[rid].outputs[0], delta[rid].outputs[0]
        assert a.token_ids == b.token_ids and [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob)
