"""Inference weight layout for memory-bound decode on CPU, applied to a built model from outside.

Measured here (2 cores, MKL): a one-row GEMM (decode: ``x (1, k) @ W.T``) runs on ONE thread and streams the
weights at ~13 GB/s with PyTorch's row-major ``(out, in)`` layout, ~20 GB/s with the transposed ``(in, out)``
layout, and ~25-29 GB/s when the columns are split into P blocks and run as one batched matmul (MKL spreads the
batch over its threads); a plain reduction reaches ~38 GB/s. ``apply_decode_layout`` replaces every ``nn.Linear``
of the decoder layers and the output head with a ``BlockedLinear`` holding ``W`` as ``(P, in, out / P)``; outputs
are the same numbers up to float summation order. Projections that read the same input (q/k/v, gate/up) are fused
into one ``BlockedLinear`` shared by ``FusedSlice`` views: fewer, larger matmuls, which matters on small models where
each call's fixed cost is a large part of a decode step. The engine applies it to its private model; the model you
save or train is never touched (use it only on a model you will not train or export afterwards).
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

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (P, M, out/P) without bias: block p = output columns p*out/P .. (p+1)*out/P."""
        x2 = x.reshape(1, -1, self.in_features).expand(self.parts, -1, -1)  # (P, M, in), no copy
        return torch.bmm(x2, self.weight_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(x).transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class _Fused:
    """One matmul for several projections of the same input; remembers the last input it saw (by identity)."""

    def __init__(self, linears: list[nn.Linear], parts: int):
        fused = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears),
                          bias=linears[0].bias is not None, device=linears[0].weight.device,
                          dtype=linears[0].weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([l.weight for l in linears]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([l.bias for l in linears]))
        total = fused.out_features
        self.linear = BlockedLinear(fused, parts if total % parts == 0 else 1)
        self.sizes = [l.out_features for l in linears]
        # gate/up with P = 2 blocks: block i IS projection i, so each output is a contiguous block of the bmm
        # result and the (M, P, out/P) -> (M, out) transpose copy is skipped (a 16 MB copy per layer per
        # 1,024-token prefill step on `base`)
        p = self.linear.parts
        self.aligned = (fused.bias is None and len(set(self.sizes)) == 1 and p % len(self.sizes) == 0)
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:  # NOTE: the first of the projections called on a new input computes all of them
            if self.aligned:
                y, k, lead = self.linear.blocks(x), self.linear.parts // len(self.sizes), x.shape[:-1]
                self._outputs = tuple(y[i * k:(i + 1) * k].transpose(0, 1).reshape(*lead, -1)
                                      for i in range(len(self.sizes)))  # a view when k == 1
            else:
                self._outputs = torch.split(self.linear(x), self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:  # the last consumer: drop the references (no stale activations kept)
            self._input, self._outputs = None, ()
        return out


class FusedSlice(nn.Module):
    """Stands where one of the fused projections was; returns its slice of the fused output."""

    def __init__(self, fused: _Fused, index: int):
        super().__init__()
        self.fused, self.index = fused, index
        if index == 0:
            self.fused_linear = fused.linear  # registered once, so .to() / buffers follow the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x, self.index)


def _fuse(parent: nn.Module, names: list[str], parts: int) -> None:
    linears = [getattr(parent, n) for n in names]
    if not all(isinstance(l, nn.Linear) for l in linears) or len({l.bias is None for l in linears}) != 1:
        return
    fused = _Fused(linears, parts)
    for i, n in enumerate(names):
        setattr(parent, n, FusedSlice(fused, i))


def apply_decode_layout(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Fuse q/k/v and gate/up, then swap the remaining ``nn.Linear`` modules of the decoder and the head for
    ``BlockedLinear`` (P = torch threads). Idempotent."""
    parts = parts or max(1, torch.get_num_threads())
    for layer in getattr(getattr(model, "model", None), "layers", []):
        _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"], parts)
        _fuse(layer.mlp, ["gate_proj", "up_proj"], parts)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        p = parts if linear.out_features % parts == 0 else 1
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, BlockedLinear(linear, p))
    return model
