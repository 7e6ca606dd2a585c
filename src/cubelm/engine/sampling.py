"""Token sampling numerics shared by every generator: filters (top-k, top-p, min-p) and safe probabilities.

``temperature`` below ``SAMPLING_EPS`` is greedy (argmax), exactly what ``transformers`` does with
``do_sample=False``; the reference generator and the engine's batched sampler both go through ``sample_probs``.

Numerical safety (every value the API accepts must give a valid distribution): a ``top_p`` too small for float32
(1e-176 rounds to 0.0) would mask every token, a temperature of 1e-300 or a repetition penalty of 1e-300 turns
logits into ±inf and softmax into NaN. So: the most likely token always survives the filters, non-finite logits
are clamped to the float32 range before softmax, and a row that still is not a distribution (a model that emits
NaN) falls back to its argmax instead of crashing the batch.
"""

from __future__ import annotations

import torch

SAMPLING_EPS = 1e-5  # vLLM's threshold: temperatures below it are treated as greedy


def filter_logits(logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor,
                  min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p / min-p set to -inf. logits (B, V), temperature-scaled.

    ``top_k`` (0 = off), ``top_p`` (1 = off) and ``min_p`` (0 = off) are scalars or per-row tensors (B,). Top-p
    is applied to the distribution renormalized after top-k, as transformers and vLLM do. The most likely token of
    each row always stays, whatever the parameters.
    """
    B, V = logits.shape
    as_rows = lambda x, dtype: (x if torch.is_tensor(x) else torch.tensor([x], dtype=dtype)).to(logits.device)
    top_k, top_p, min_p = as_rows(top_k, torch.long), as_rows(top_p, torch.float32), as_rows(min_p, torch.float32)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        # NOTE: the row maximum is never below min_p (<= 1) times itself, so at least one token stays
        logits = logits.masked_fill(probs < min_p.unsqueeze(-1) * probs.amax(-1, keepdim=True), float("-inf"))
    if not bool(((top_k > 0) & (top_k < V)).any() or (top_p < 1).any()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).unsqueeze(-1)
    drop = torch.arange(V, device=logits.device) >= k  # beyond top-k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # drop a token when the mass of the tokens ranked above it already reaches top_p; the first always stays
    # (explicitly: a top_p that underflows float32 to 0.0 would otherwise drop it too)
    drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> the largest finite value: softmax of the result is defined unless a row is all -inf."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def sample_probs(logits: torch.Tensor, temperature: float | torch.Tensor, top_k, top_p, min_p=0.0) -> torch.Tensor:
    """The distribution to draw from: rows (B, V) of float32 probabilities, each a valid distribution."""
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).reshape(-1, 1)
    scaled = finite_logits(finite_logits(logits.float()) / temp.clamp(min=SAMPLING_EPS))
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(-1)
    bad = ~torch.isfinite(probs.sum(-1)) | (probs.sum(-1) <= 0)
    if bool(bad.any()):  # only a model emitting NaN for a whole row gets here: take its argmax, stay alive
        fallback = torch.nn.functional.one_hot(scaled.argmax(-1), logits.shape[-1]).to(probs.dtype)
        probs = torch.where(bad.unsqueeze(-1), fallback, probs)
    return probs


def sample(logits: torch.Tensor, params, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) for one ``SamplingParams``. Computes in fp32 whatever the model dtype."""
    if params.greedy:
        return finite_logits(logits.float()).argmax(dim=-1)
    probs = sample_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
