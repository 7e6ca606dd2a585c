"""Token sampling from logits: greedy, temperature, top-k and top-p (nucleus), with an optional seeded generator.

``temperature == 0`` is greedy (argmax), exactly what ``transformers`` does with ``do_sample=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CubelmError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise CubelmError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CubelmError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor,
                  min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p / min-p set to -inf. logits (B, V), temperature-scaled.

    ``top_k`` (0 = off), ``top_p`` (1 = off) and ``min_p`` (0 = off) are scalars or per-row tensors (B,). Top-p
    is applied to the distribution renormalized after top-k, as transformers and vLLM do.
    """
    B, V = logits.shape
    as_rows = lambda x, dtype: (x if torch.is_tensor(x) else torch.tensor([x], dtype=dtype)).to(logits.device)
    top_k, top_p, min_p = as_rows(top_k, torch.long), as_rows(top_p, torch.float32), as_rows(min_p, torch.float32)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p.unsqueeze(-1) * probs.amax(-1, keepdim=True), float("-inf"))
    if not bool(((top_k > 0) & (top_k < V)).any() or (top_p < 1).any()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(-1)
    drop = torch.arange(V, device=logits.device) >= k  # beyond top-k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # drop a token when the mass of the tokens ranked above it already reaches top_p (the first always stays)
    drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Computes in fp32 whatever the model dtype."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
