"""Reference generation: one sequence, a contiguous KV cache, prefill then token-by-token decode.

Deliberately simple — it is the oracle the paged engine is tested against. ``generate_tokens`` yields token ids
as they are sampled; ``generate_text`` streams decoded text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from cubelm.engine.params import SamplingParams
from cubelm.engine.sampling import sample
from cubelm.errors import CubelmError
from cubelm.model.attention import KVCache
from cubelm.model.transformer import CausalLM


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop token) or "length"


@torch.no_grad()
def generate_tokens(model: CausalLM, prompt_ids: list[int], params: SamplingParams,
                    result: GenerationResult | None = None, *, eos_token_ids: Iterable[int] | None = None
                    ) -> Iterator[int]:
    """Yield sampled token ids (EOS/stop tokens are not yielded); ``result`` receives the finish reason.

    Honours ``max_tokens``, ``temperature``/``top_k``/``top_p``/``min_p``, ``seed``, ``ignore_eos`` and
    ``stop_token_ids`` of ``params`` (penalties and stop strings are the engine's). ``eos_token_ids`` defaults to
    the model config's."""
    cfg = model.config
    if not prompt_ids:
        raise CubelmError("the prompt is empty; give at least one token of text")
    room = cfg.max_position_embeddings - len(prompt_ids)
    if room < 1:
        raise CubelmError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                          f"{cfg.max_position_embeddings}; shorten the prompt")
    max_new = min(params.max_tokens, room)
    param = next(model.parameters())
    device = param.device
    eos = cfg.eos_token_ids if eos_token_ids is None else eos_token_ids
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
    seed = params.seed_for(0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(cfg, 1, len(prompt_ids) + max_new, device=device, dtype=param.dtype)
    result = result if result is not None else GenerationResult([], "length")

    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
    for step in range(max_new):
        cache.step(ids.shape[1])
        logits = model(ids, positions, cache)[:, -1]  # (1, vocab)
        token = sample(logits, params, generator)  # (1,)
        token_id = int(token)  # NOTE: the one host sync per step; the decision to stop needs it
        if token_id in stop:
            result.finish_reason = "stop"
            return
        result.token_ids.append(token_id)
        yield token_id
        ids = token.view(1, 1)
        positions = torch.tensor([[len(prompt_ids) + step]], device=device)
    result.finish_reason = "length"
