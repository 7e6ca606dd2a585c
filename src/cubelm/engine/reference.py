"""Reference generation: one sequence, a contiguous KV cache, prefill then token-by-token decode.

Deliberately simple — it is the oracle the paged engine is tested against. ``generate_tokens`` yields token ids
as they are sampled; ``generate_text`` streams decoded text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cubelm.engine.sampling import SamplingConfig, sample
from cubelm.errors import CubelmError
from cubelm.model.attention import KVCache
from cubelm.model.transformer import CausalLM


@dataclass(slots=True, kw_only=True)
class GenerationConfig(SamplingConfig):
    max_new_tokens: int = 128
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        SamplingConfig.__post_init__(self)
        if self.max_new_tokens < 1:
            raise CubelmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop token) or "length"


@torch.no_grad()
def generate_tokens(model: CausalLM, prompt_ids: list[int], gen: GenerationConfig,
                    result: GenerationResult | None = None) -> Iterator[int]:
    """Yield sampled token ids (EOS/stop tokens are not yielded); ``result`` receives the finish reason."""
    cfg = model.config
    if not prompt_ids:
        raise CubelmError("the prompt is empty; give at least one token of text")
    room = cfg.max_position_embeddings - len(prompt_ids)
    if room < 1:
        raise CubelmError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                          f"{cfg.max_position_embeddings}; shorten the prompt")
    max_new = min(gen.max_new_tokens, room)
    param = next(model.parameters())
    device = param.device
    stop = set(gen.stop_token_ids) | (set() if gen.ignore_eos else set(cfg.eos_token_ids))
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
    cache = KVCache(cfg, 1, len(prompt_ids) + max_new, device=device, dtype=param.dtype)
    result = result if result is not None else GenerationResult([], "length")

    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
    for step in range(max_new):
        cache.step(ids.shape[1])
        logits = model(ids, positions, cache)[:, -1]  # (1, vocab)
        token = sample(logits, gen, generator)  # (1,)
        token_id = int(token)  # NOTE: the one host sync per step; the decision to stop needs it
        if token_id in stop:
            result.finish_reason = "stop"
            return
        result.token_ids.append(token_id)
        yield token_id
        ids = token.view(1, 1)
        positions = torch.tensor([[len(prompt_ids) + step]], device=device)
    result.finish_reason = "length"
