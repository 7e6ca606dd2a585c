"""What a fine-tuning run is: ``FinetuneConfig`` (base model, data, method, adapter) and its training defaults.

The optimizer, schedule, batch and checkpoint settings are a ``TrainConfig``, as for ``cubelm train``; only the
defaults differ by method. LoRA trains a few thousand times fewer parameters from zero-initialized B, so it takes
a learning rate ~10x higher than full fine-tuning, which moves every pretrained weight (Hu et al. 2021 and peft's
examples use 1e-4..1e-3 for LoRA, 1e-5..1e-4 for full). Weight decay is off (trl's default): shrinking adapters
toward zero only pulls the model back to the base.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from cubelm.errors import CubelmError
from cubelm.finetune.config import LoraConfig
from cubelm.train.config import TrainConfig

METHODS = ("full", "lora", "qlora")

TRAIN_DEFAULTS = dict(seq_len=512, micro_batch_size=8, grad_accum=1, max_steps=300, warmup_steps=10,
                      weight_decay=0.0, eval_interval=100, checkpoint_interval=100, keep_last=2)
LR = {"full": 1e-4, "lora": 2e-3, "qlora": 2e-3}


@dataclass(slots=True, kw_only=True)
class FinetuneConfig:
    model: str  # the base model directory (HF format)
    data: str  # a .jsonl file or stdlib-instruct[:MODULES]
    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)  # unused by method "full"
    val_fraction: float = 0.05  # of rows (JSONL) or of modules (stdlib-instruct) held out for validation
    max_val_examples: int = 256  # evaluate on at most this many held-out examples; 0 = all
    truncate: bool = False  # cut examples longer than the context instead of dropping them

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CubelmError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.val_fraction < 1:
            raise CubelmError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_val_examples < 0:
            raise CubelmError(f"--max-val-examples must be >= 0 (0 = all), got {self.max_val_examples}")

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    def to_dict(self) -> dict:
        """JSON-native (lists, not tuples), so it compares equal with what a checkpoint read back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora"}
        if self.uses_adapter:
            d["lora"] = {f.name: getattr(self.lora, f.name) for f in dataclasses.fields(self.lora)}
        return json.loads(json.dumps(d))


def finetune_train_config(method: str, **overrides) -> TrainConfig:
    """``TrainConfig`` with fine-tuning's defaults for ``method``; ``None`` overrides are ignored."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    lr = chosen.get("lr", LR.get(method, LR["lora"]))
    defaults = dict(TRAIN_DEFAULTS, lr=lr, min_lr=lr / 10)
    config = {**defaults, **chosen}
    if "warmup_steps" not in chosen and config["warmup_steps"] >= config["max_steps"]:  # short run: warm up 10%
        config["warmup_steps"] = config["max_steps"] // 10
    return TrainConfig(**config)
