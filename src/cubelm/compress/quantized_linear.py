"""``QuantLinear`` (a linear layer over cubelm's int8 / int4 weights) and ``apply_weight_quantization``.

    from cubelm.compress.quantized_linear import apply_weight_quantization
    apply_weight_quantization(model, "int4", group_size=32)   # in place, inference only

The weights stay compressed in memory (``cubelm.compress.quantize`` for the format). Up to ``qgemm.MAX_ROWS`` rows
(decode steps) run in the native kernel (``cubelm.engine.kernels.qgemm``), which streams the int8 / packed int4
bytes and quantizes the activation rows to int8 in blocks of 32 on the way. More rows (prefill, compute-bound) and
machines without the kernel (``CUBELM_KERNELS=0``, no compiler, other devices, other dtypes) dequantize the weight
to the input's dtype and run one matmul: same weights, float activations, so the two paths differ by the
activation rounding only (a test bounds it).

Like the decode layout (``cubelm.engine.decode_layout``), projections that read the same input (q/k/v, gate/up)
are fused into one ``QuantLinear`` whose rows are theirs concatenated (scales are per row or per row-group, so
quantizing the concatenation is quantizing each) and shared by ``FusedSlice`` views: one kernel call each.
Apply it before ``apply_decode_layout``: that only replaces the remaining ``nn.Linear`` (the output head unless
``include_head``) and leaves quantized modules alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cubelm.compress.quantize import QuantizedWeight, check_hidden_size, check_method, quantize_weight
from cubelm.engine.decode_layout import FusedSlice, _Fused
from cubelm.engine.kernels import qgemm
from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS, find_linears, replace_module

FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a ``QuantizedWeight`` (its tensors are buffers: ``.to()`` moves them)."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.method, self.group_size = q.method, q.group_size
        self.in_features, self.out_features = q.in_features, q.out_features
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("scales", q.scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int | None = None) -> QuantLinear:
        return cls(quantize_weight(linear.weight, method, group_size), linear.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.method, self.qweight, self.scales, self.in_features, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.quantized.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def _use_kernel(self, x2: torch.Tensor) -> bool:
        return (x2.shape[0] <= qgemm.MAX_ROWS and x2.device.type == "cpu" and x2.dtype == torch.float32
                and qgemm.available() and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._use_kernel(x2):
            y = qgemm.qgemm(x2.contiguous(), self.qweight, self.scales, 8 if self.method == "int8" else 4,
                            self.group_size, self.out_features)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2, self.quantized.dequantize(x.dtype), self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"


def concat(layers: list[QuantLinear]) -> QuantLinear:
    """One ``QuantLinear`` whose output rows are ``layers``' in order (they share in_features and the format)."""
    first = layers[0]
    q = QuantizedWeight(first.method, torch.cat([p.qweight for p in layers]), torch.cat([p.scales for p in layers]),
                        first.in_features, first.group_size)
    bias = None if first.bias is None else torch.cat([p.bias for p in layers])
    return QuantLinear(q, bias)


class _QuantFused(_Fused):
    """The decode layout's fused-projection holder, over a concatenated ``QuantLinear``."""

    def __init__(self, layers: list[QuantLinear]):  # NOTE: no super().__init__: that one builds a BlockedLinear
        self.linear = concat(layers)
        self.sizes = [p.out_features for p in layers]
        self._input, self._outputs = None, ()


def fuse_quantized(model: nn.Module) -> None:
    """Fuse each layer's q/k/v and gate/up ``QuantLinear`` into one (skipped where they are not all quantized with
    the same format and bias presence)."""
    for layer in getattr(getattr(model, "model", None), "layers", []):
        for sub, names in FUSED_GROUPS:
            parent = getattr(layer, sub, None)
            mods = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, QuantLinear) for m in mods):
                continue
            if len({(m.method, m.group_size, m.in_features, m.bias is None) for m in mods}) != 1:
                continue
            fused = _QuantFused(mods)
            for i, n in enumerate(names):
                setattr(parent, n, FusedSlice(fused, i))


def quantization_targets(include_head: bool) -> tuple[str, ...]:
    return PROJECTIONS + (("lm_head",) if include_head else ())


def apply_weight_quantization(model: nn.Module, method: str, group_size: int | None = None,
                              include_head: bool = False, fuse: bool = True) -> nn.Module:
    """Replace the decoder's projections (and the output head if ``include_head``) with ``QuantLinear`` in place,
    then fuse q/k/v and gate/up (``fuse``). int4 needs ``group_size`` in (32, 64, 128) dividing the hidden size.
    Inference only: the original float weights are dropped."""
    check_method(method, group_size)
    check_hidden_size(method, group_size, model.config.hidden_size)
    group_size = group_size if method == "int4" else None
    held = {(m.method, m.group_size) for m in model.modules() if isinstance(m, QuantLinear)}
    if held - {(method, group_size)}:
        have = ", ".join(sorted(f"{m}{f' g={g}' if g else ''}" for m, g in held))
        raise CubelmError(f"the model is already quantized ({have}); load its float source to quantize it as "
                          f"{method}{f' g={group_size}' if group_size else ''}, or drop the quantization option")
    for name, mod in find_linears(model, quantization_targets(include_head)):
        if isinstance(mod, nn.Linear):
            replace_module(model, name, QuantLinear.from_linear(mod, method, group_size))
    if fuse:
        fuse_quantized(model)
    return model
