"""Pooling token states into one vector per text (book §3.3.2): CLS, mean, max or last token.

An encoder's hidden states are contextual, one vector per token; a sentence embedding pools them. BERT-style
encoders trained with a classification head use the ``[CLS]`` state; sentence-transformers models such as
all-MiniLM-L6-v2 were trained with the mean over real tokens (padding excluded); decoder-only models can only
"see" the whole text from the last token (causal attention), so they use it (as e5-mistral, gte-Qwen do).

The mode is read from a sentence-transformers model directory (``1_Pooling/config.json``: the
``pooling_mode_*_tokens`` flags or the newer ``pooling_mode`` string, and ``include_prompt``) when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cubelm.errors import CubelmError

MODES = ("cls", "mean", "max", "last")
_ALIASES = {"lasttoken": "last", "last_token": "last", "mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    mode: str = "mean"
    include_prompt: bool = True  # False: the prompt's tokens are left out of the pool (INSTRUCTOR-style models)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CubelmError(f"pooling {self.mode!r} is not supported; use one of {', '.join(MODES)}")


def parse_mode(name: str) -> str:
    mode = _ALIASES.get(name.lower(), name.lower())
    if mode not in MODES:
        raise CubelmError(f"pooling {name!r} is not supported; use one of {', '.join(MODES)}")
    return mode


def read_pooling_config(model_dir: Path) -> PoolingConfig | None:
    """The pooling of a sentence-transformers directory, or None if it has no pooling module."""
    path = _pooling_dir(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CubelmError(f"{path} is not valid JSON ({e})") from None
    if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 5 writes the mode by name
        modes = [cfg["pooling_mode"]]
    else:
        modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if len(modes) != 1:
        raise CubelmError(f"{path}: exactly one pooling mode must be on, found {modes or 'none'} (concatenated "
                          f"poolings are not supported)")
    return PoolingConfig(mode=parse_mode(modes[0]), include_prompt=bool(cfg.get("include_prompt", True)))


def _pooling_dir(model_dir: Path) -> Path:
    """modules.json names the pooling module's folder; ``1_Pooling`` is the usual one."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                return model_dir / m.get("path", "1_Pooling")
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        pass
    return model_dir / "1_Pooling"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) with 1 on the tokens to pool -> (B, H) in float32.

    Sequences are right-padded, so a row's real tokens are ``mask[b, :n_b]`` (pooling may also drop a prompt
    at the start of the row). ``last`` takes the last pooled token of each row.
    """
    hidden = hidden.float()  # NOTE: accumulate in fp32 whatever the model's dtype
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if mode == "mean":
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
    if mode == "cls":
        first = mask.int().argmax(dim=1)  # the first pooled position (0 unless a prompt is excluded)
        return hidden[torch.arange(hidden.shape[0]), first]
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0]), last]
    raise CubelmError(f"pooling {mode!r} is not supported; use one of {', '.join(MODES)}")
