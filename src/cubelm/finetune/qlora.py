"""QLoRA (book ch. 5; Dettmers et al. 2023): LoRA adapters on a frozen base whose projections are stored in NF4.

``apply_qlora(model, cfg)`` replaces the ``nn.Linear`` of every projection ``cfg`` targets with an ``NF4Linear``
(``cubelm.compress.nf4``: 4-bit NormalFloat codes, blocks of 64, double-quantized scales: 4.127 bits per weight)
through ``cubelm.model.seam``, then calls ``apply_lora`` on top, so each targeted projection becomes
``LoRALinear(base_layer=NF4Linear)``. Only targeted projections are quantized; embeddings, norms and ``lm_head``
stay as they are (``lm_head`` is never quantized, as bitsandbytes skips it: it may be tied to the embedding, and its
error falls straight on the logits). The adapters train in the compute dtype; the base is dequantized to it per
matmul. ``merge_lora`` on the result dequantizes and folds the adapters in, giving a plain full-precision model;
``save_adapter`` writes ordinary peft files (an adapter knows nothing of how its base was stored).
"""

from __future__ import annotations

import torch
from torch import nn

from cubelm.compress.nf4 import NF4Linear
from cubelm.errors import CubelmError
from cubelm.finetune.config import LoraConfig
from cubelm.finetune.lora import apply_lora
from cubelm.model.seam import find_linears, replace_module

_NEVER_QUANTIZED = ("lm_head",)


def quantize_base(model: nn.Module, cfg: LoraConfig, *,
                  compute_dtype: torch.dtype | str | None = None) -> list[str]:
    """Replace each targeted projection's ``nn.Linear`` with an ``NF4Linear``; returns the quantized names."""
    names = tuple({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})
    done = []
    for name, mod in find_linears(model, names):
        if not isinstance(mod, nn.Linear) or not cfg.targets(name) or name.rsplit(".", 1)[-1] in _NEVER_QUANTIZED:
            continue
        dtype = _compute_dtype(compute_dtype, mod.weight)
        replace_module(model, name, NF4Linear.from_linear(mod, dtype))
        done.append(name)
    return done


def apply_qlora(model: nn.Module, cfg: LoraConfig, *, compute_dtype: torch.dtype | str | None = None) -> nn.Module:
    """NF4 base + LoRA adapters; ``compute_dtype`` defaults to each weight's own dtype (fp32 on CPU). Returns
    ``model``, changed in place: frozen, with only the adapters trainable."""
    quantize_base(model, cfg, compute_dtype=compute_dtype)
    return apply_lora(model, cfg)


def nf4_layers(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, NF4Linear)]


@torch.no_grad()
def dequantize_base(model: nn.Module) -> nn.Module:
    """Put a plain ``nn.Linear`` holding the dequantized weight wherever an ``NF4Linear`` is (adapters stay):
    the model QLoRA actually trained against, in full precision."""
    for name, layer in nf4_layers(model):
        w = layer.dequantize()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device,
                           dtype=w.dtype)
        linear.weight.copy_(w)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
    return model


def _compute_dtype(requested: torch.dtype | str | None, weight: torch.Tensor) -> torch.dtype:
    if requested is None:
        return weight.dtype if weight.is_floating_point() else torch.float32
    if isinstance(requested, str):
        from cubelm.model.hf_io import resolve_dtype
        return resolve_dtype(requested, weight.device)
    if not isinstance(requested, torch.dtype) or not requested.is_floating_point:
        raise CubelmError(f"compute_dtype must be float32, bfloat16 or float16, got {requested!r}")
    return requested
