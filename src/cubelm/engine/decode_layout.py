"""Inference weight layout for memory-bound decode on CPU, applied to a built model from outside.

Measured here (2 cores, MKL): a one-row GEMM (decode: ``x (1, k) @ W.T``) runs on ONE thread and streams the
weights at ~13 GB/s with PyTorch's row-major ``(out, in)`` layout, ~20 GB/s with the transposed ``(in, out)``
layout, and ~25-29 GB/s when the columns are split into P blocks and run as one batched matmul (MKL spreads the
batch over its threads); a plain reduction reaches ~38 GB/s. ``apply_decode_layout`` replaces every ``nn.Linear``
of the decoder layers and the output head with a ``BlockedLinear`` holding ``W`` as ``(P, in, out / P)``; outputs
are the same numbers up to float summation order. The engine applies it to its private model; the model you save
or train is never touched (use it only on a model you will not train or export afterwards).
"""

from __future__ import annotations

import torch
from torch import nn


class BlockedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        w = linear.weight.detach()
        # (out, in) -> (in, out) -> (in, P, out/P) -> (P, in, out/P): block p holds output columns p*n/P..(p+1)*n/P
        self.register_buffer("weight_blocks", w.T.contiguous().view(in_features, parts, out_features // parts)
                             .permute(1, 0, 2).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(1, -1, self.in_features).expand(self.parts, -1, -1)  # (P, M, in), no copy
        y = torch.bmm(x2, self.weight_blocks)  # (P, M, out/P)
        y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def apply_decode_layout(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Swap the decoder's and the head's ``nn.Linear`` modules for ``BlockedLinear`` (P = torch threads)."""
    parts = parts or max(1, torch.get_num_threads())
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        p = parts if linear.out_features % parts == 0 else 1
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, BlockedLinear(linear, p))
    return model
