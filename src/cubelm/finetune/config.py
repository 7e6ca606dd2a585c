"""``LoraConfig``: peft's LoRA fields, names and defaults, and the per-module rank and scale they imply.

LoRA (book ch. 5; Hu et al. 2021) freezes W (d_out x d_in) and learns W + s * B A with A (r x d_in), B (d_out x r):
r (d_in + d_out) trainable parameters instead of d_in * d_out. The scale s is ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), which keeps updates stable as r grows. ``rank_pattern``
and ``alpha_pattern`` override r and alpha for the modules whose name matches (peft's regex rule: the key matches
the end of the module name at a dot boundary).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS


@dataclass(slots=True, kw_only=True)
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = PROJECTIONS  # names, or one regex over qualified names (peft)
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise CubelmError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise CubelmError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise CubelmError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise CubelmError("target_modules is empty: name the projections to adapt, e.g. q_proj,v_proj")
        for name, r in self.rank_pattern.items():
            if not isinstance(r, int) or r < 1:
                raise CubelmError(f"rank_pattern[{name!r}] must be an integer >= 1, got {r!r}")

    def targets(self, qualified_name: str) -> bool:
        """Whether the module ``qualified_name`` (``model.layers.0.self_attn.q_proj``) gets an adapter."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, qualified_name) is not None
        return qualified_name.rsplit(".", 1)[-1] in self.target_modules

    def rank_for(self, qualified_name: str) -> int:
        return _pattern_value(self.rank_pattern, qualified_name, self.r)

    def scale_for(self, qualified_name: str) -> float:
        r = self.rank_for(qualified_name)
        alpha = _pattern_value(self.alpha_pattern, qualified_name, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def _pattern_value(patterns: dict, qualified_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", qualified_name):
            return value
    return default
