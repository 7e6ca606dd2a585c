"""The one seam through which a built model's linear layers are replaced from outside.

Every transform that changes how a projection computes (the engine's decode weight layout, quantized weights,
LoRA adapters) finds the projections with ``find_linears`` and swaps them with ``replace_module``; ``forward``
never branches on which kind it holds. The replacements are plain modules that keep the projection's call
signature, so they stack: a LoRA layer wraps whatever base it finds (``nn.Linear``, an NF4 layer, the decode
layout's blocked or fused slices), and the native kernels key on the class of the innermost module.

Projection names are the Hugging Face checkpoint names, so a target list is the same one peft users write.
"""

from __future__ import annotations

from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def find_linears(model: nn.Module, targets: tuple[str, ...] | list[str] = PROJECTIONS) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every submodule whose last name is in ``targets``, in model order (the layers
    of ``model.layers``, then ``lm_head`` if targeted)."""
    wanted = set(targets)
    return [(name, mod) for name, mod in model.named_modules() if name and name.rsplit(".", 1)[-1] in wanted]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
