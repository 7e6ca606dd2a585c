"""Activation checkpointing applied to a built model from outside: each decoder layer recomputes its
activations in backward instead of storing them (non-reentrant ``torch.utils.checkpoint``).

Only the layer inputs stay alive across the forward pass, trading one extra layer forward per layer in backward
for activation memory (see ``cubelm plan`` for the estimate). Parameter names are unchanged, so checkpoints and
exports do not notice.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        if getattr(layer, "_cubelm_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._cubelm_checkpointed = True
    return model
