"""AsyncLLM: streaming equals offline results; a client that goes away frees its KV blocks."""

import asyncio
import time

import pytest
import torch

from cubelm.engine.async_engine import AsyncLLM
from cubelm.engine.config import EngineConfig
from cubelm.engine.llm_engine import LLMEngine
from cubelm.engine.params import SamplingParams
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1)
    return LLMEngine(build_model(cfg, seed=1).eval(), None, EngineConfig(num_blocks=128, block_size=4),
                     log=lambda m: None)


def test_stream_and_abort(engine):
    llm = AsyncLLM(engine)

    async def main():
        greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        finals = [out async for out in llm.generate([5, 6, 7, 8], greedy)]
        assert len(finals) == 1 and finals[0].finished  # output_kind "final": one output, at the end
        deltas = [out async for out in llm.generate([5, 6, 7, 8], SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, output_kind="delta"))]
        assert deltas[-1].finished and len(deltas) >= 2 and all(d.outputs[0].token_ids for d in deltas)
        assert [t for d in deltas for t in d.outputs[0].token_ids] == finals[0].outputs[0].token_ids

        async def consume_two():
            seen = 0
            async for _ in llm.generate([9, 10, 11], SamplingParams(temperature=0, max_tokens=200,
                                                                    ignore_eos=True, output_kind="delta")):
                seen += 1
                if seen == 2:
                    return  # the client goes away mid-stream
        await asyncio.gather(consume_two(), consume_two())
        return finals[0]

    try:
        final = asyncio.run(main())
        expected = torch.tensor(final.outputs[0].token_ids)
        assert len(expected) == 20
        deadline = time.time() + 10
        while engine.has_unfinished_requests() and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.has_unfinished_requests()
        engine.block_manager.check_whole()
    finally:
        llm.shutdown()


def test_bad_request_raises_to_client(engine):
    llm = AsyncLLM(engine)

    async def main():
        with pytest.raises(ValueError, match="context length"):
            async for _ in llm.generate([5] * 300, SamplingParams()):
                pass
    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
