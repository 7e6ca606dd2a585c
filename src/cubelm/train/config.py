"""Training configuration (one dataclass) and recipes: ``tiny`` (the default model), ``small``, ``base``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class TrainConfig:
    preset: str = "tiny"
    seq_len: int = 256
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    compile: bool = False
    eval_interval: int = 200
    eval_batches: int = 8
    sample_interval: int = 0  # 0 = with every eval
    checkpoint_interval: int = 200
    keep_last: int = 2
    seed: int = 1337
    device: str = "cpu"
    stop_after: int | None = None  # stop this invocation after so many steps (the schedule still uses max_steps)
    checkpoint_alpha: bool = True  # at each checkpoint, log the projections' power-law alpha (compress.spectral)

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise CubelmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise CubelmError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise CubelmError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise CubelmError(f"warmup_steps must be in [0, max_steps), got {self.warmup_steps}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Recipes: what `cubelm build-default` and `cubelm train --recipe NAME` use. `tiny` is sized for ~10 minutes on
# two CPU cores (~4k tokens/s => ~2.4M tokens); small and base are for longer runs or a GPU.
RECIPES: dict[str, dict] = {
    "tiny": dict(preset="tiny", seq_len=256, micro_batch_size=16, max_steps=560, lr=3e-3, min_lr=3e-4,
                 warmup_steps=40, eval_interval=140, checkpoint_interval=140),
    "small": dict(preset="small", seq_len=512, micro_batch_size=16, grad_accum=2, max_steps=4000, lr=2e-3,
                  min_lr=2e-4, warmup_steps=200, eval_interval=500, checkpoint_interval=500),
    "base": dict(preset="base", seq_len=1024, micro_batch_size=8, grad_accum=8, max_steps=20000, lr=6e-4,
                 min_lr=6e-5, warmup_steps=1000, eval_interval=1000, checkpoint_interval=1000),
}


def recipe(name: str, **overrides) -> TrainConfig:
    if name not in RECIPES:
        raise CubelmError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}})
