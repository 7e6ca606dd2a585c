"""LoRA layers applied to a built model from outside: ``apply_lora``, ``merge_lora``, trainable-parameter counts.

``apply_lora(model, cfg)`` freezes every parameter, then wraps each targeted projection (found through
``cubelm.model.seam``) in a ``LoRALinear``: ``base_layer(x) + s * lora_B(lora_A(dropout(x)))``. The module names
are peft's (``q_proj.base_layer``, ``q_proj.lora_A``, ``q_proj.lora_B``), so adapter tensors map to peft's file
keys by prefix alone (``cubelm.finetune.adapter``). The base can be any projection module exposing
``in_features`` and ``out_features`` (``nn.Linear``, an NF4 layer for QLoRA): ``forward`` of the model gains no
branch. Initialization is peft's default: A Kaiming-uniform (a = sqrt 5, as ``nn.Linear``), B zero, so the adapted
model starts equal to the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.finetune.config import LoraConfig
from cubelm.model.seam import find_linears, replace_module


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scale = r, scale
        weight = next((p for p in base_layer.parameters()), None)
        # adapters train in the compute dtype of the base (fp32 on CPU), on its device; an NF4 base stores uint8,
        # so its compute dtype comes from the layer itself
        dtype = getattr(base_layer, "compute_dtype", None) or (weight.dtype if weight is not None and
                                                                weight.is_floating_point() else torch.float32)
        device = weight.device if weight is not None else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the adapters run in their own dtype, which differs from x's when an NF4 base computes in bf16 inside an
        # fp32 model (both casts are no-ops otherwise); s * B(A x) == B(s * A x): scaling the (..., r) tensor
        # instead of the (..., out) one saves a full-width temporary in forward and backward
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))) * self.scale)
        return self.base_layer(x) + delta.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, (out, in): what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze ``model`` and wrap its targeted projections in ``LoRALinear``; returns ``model`` (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = [(name, mod) for name, mod in find_linears(model, _all_projection_names(model))
                  if not isinstance(mod, LoRALinear) and ".base_layer" not in name and ".lora_" not in name]
    targets = [(name, mod) for name, mod in candidates if cfg.targets(name)]
    if not targets:
        have = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
        raise CubelmError(f"target_modules {_show(cfg.target_modules)} match no projection of this model; it has "
                          f"{', '.join(have)}")
    dropout = cfg.lora_dropout
    for name, mod in targets:
        replace_module(model, name, LoRALinear(mod, cfg.rank_for(name), cfg.scale_for(name), dropout))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + s B A) and put plain ``nn.Linear`` layers back. An NF4 base
    (QLoRA) is dequantized first, so the merged model is full precision."""
    for name, layer in lora_layers(model):
        base = layer.base_layer
        if isinstance(base, nn.Linear):
            merged = base
        elif hasattr(base, "dequantize"):
            w = base.dequantize()
            merged = nn.Linear(layer.in_features, layer.out_features, bias=getattr(base, "bias", None) is not None,
                               device=w.device, dtype=w.dtype)
            merged.weight.copy_(w)
            if merged.bias is not None:
                merged.bias.copy_(base.bias)
        else:
            raise CubelmError(f"cannot merge the adapter of {name}: its base {type(base).__name__} has no weight")
        merged.weight += layer.delta_weight().to(merged.weight.dtype)
        replace_module(model, name, merged)
    return model


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _all_projection_names(model: nn.Module) -> tuple[str, ...]:
    """Every submodule name that holds an ``in_features``/``out_features`` projection (peft targets any linear)."""
    return tuple({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                  if name and hasattr(mod, "in_features") and hasattr(mod, "out_features")})


def _show(targets) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)
