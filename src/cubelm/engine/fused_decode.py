"""Decoder layers whose elementwise work runs in fused native kernels: the engine's CPU forward, applied to a
built model from outside (``apply_fused_layers``, called by ``apply_decode_layout``).

An eager decoder layer at batch-1 decode runs ~130 ATen ops, nearly all of them elementwise work over a few
hundred floats (RMSNorm, RoPE's chunk/neg/cat/mul/add on q and k, the residual adds, SiLU and the gate product),
each costing a dispatch of a few microseconds: on small models that, not the weight stream, was most of a step.
``FusedDecoderLayer`` computes the same function with the projections called as modules (so blocked, fused,
quantized or LoRA-wrapped projections all work) and everything between them in ``kernels/decode_ops.c``:

    h = rmsnorm(x)                  one call
    qkv = qkv_proj(h)               one GEMM when q/k/v are fused (decode_layout.FusedSlice), else three
    rope(q, k) in place             one call over the q and k columns of the fused output
    a = attention backend(q, k, v)  unchanged (the paged engine writes K/V and attends)
    h = rmsnorm(x += o_proj(a))     one call, the residual updated in place
    x += down(silu(gate) * up)      one GEMM for gate/up when fused, one call for the product, one add

The layer keeps its submodules under the same names (``self_attn.q_proj`` ...), so state dicts, LoRA targeting and
``find_linears`` see the same model. The plain ``DecoderLayer.forward`` runs whenever the kernels cannot: other
dtypes or devices, no C compiler, ``CUBELM_KERNELS=0``, or inside ``torch.compile`` (which fuses on its own).
Outputs equal the plain path up to float rounding (tests compare both, and greedy tokens)."""

from __future__ import annotations

import torch
from torch import nn

from cubelm.engine.decode_layout import FusedSlice
from cubelm.engine.kernels import decode_ops
from cubelm.model.layers import RMSNorm
from cubelm.model.seam import replace_module
from cubelm.model.transformer import DecoderLayer


def _fast(x: torch.Tensor) -> bool:
    return decode_ops.supports(x) and x.is_contiguous() and not torch.compiler.is_compiling()


def _shared_fused(*projections: nn.Module):
    """The decode layout's one fused GEMM behind these projections, in order, or None."""
    if not all(type(p) is FusedSlice for p in projections):
        return None
    fused = projections[0].fused
    if any(p.fused is not fused or p.index != i for i, p in enumerate(projections)) or \
            len(fused.sizes) != len(projections):
        return None
    return fused.linear


class NativeRMSNorm(RMSNorm):
    """An ``RMSNorm`` (same ``weight`` parameter) computed in one native call when it can be."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast(x):
            return decode_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedDecoderLayer(DecoderLayer):
    """A ``DecoderLayer`` (the same submodules) whose forward fuses the work between the projections."""

    def __init__(self, layer: DecoderLayer):
        nn.Module.__init__(self)
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp

    def forward(self, x, cos, sin, attn):
        if not _fast(x):
            return super().forward(x, cos, sin, attn)
        B, T, hidden = x.shape
        sa, norm1, norm2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        Hq, Hkv, D = sa.num_heads, sa.num_kv_heads, sa.head_dim
        h = decode_ops.rms_norm(x, norm1.weight, norm1.eps).view(B * T, hidden)
        cos2, sin2 = cos.reshape(B * T, D).contiguous(), sin.reshape(B * T, D).contiguous()
        qkv_proj = _shared_fused(sa.q_proj, sa.k_proj, sa.v_proj)
        if qkv_proj is not None:
            qkv = qkv_proj(h)
            decode_ops.rope_(qkv[:, :(Hq + Hkv) * D], cos2, sin2, D)
            q, k, v = qkv[:, :Hq * D], qkv[:, Hq * D:(Hq + Hkv) * D], qkv[:, (Hq + Hkv) * D:]
        else:
            q, k, v = (decode_ops.rows_view(p(h)) for p in (sa.q_proj, sa.k_proj, sa.v_proj))
            decode_ops.rope_(q, cos2, sin2, D)
            decode_ops.rope_(k, cos2, sin2, D)
        out = attn(sa.layer_idx, q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D))
        o = sa.o_proj(out.reshape(B, T, Hq * D))
        h = decode_ops.add_rms_norm(x, o, norm2.weight, norm2.eps).view(B * T, hidden)
        mlp = self.mlp
        gate_up = _shared_fused(mlp.gate_proj, mlp.up_proj)
        if gate_up is not None:
            gu = gate_up(h)
            inter = gu.shape[1] // 2
            g, u = gu[:, :inter], gu[:, inter:]
        else:
            g, u = decode_ops.rows_view(mlp.gate_proj(h)), decode_ops.rows_view(mlp.up_proj(h))
        d = mlp.down_proj(decode_ops.silu_mul(g, u))
        return x.add_(d.view(B, T, hidden))


def apply_fused_layers(model: nn.Module) -> nn.Module:
    """Swap every ``DecoderLayer`` for a ``FusedDecoderLayer`` and every ``RMSNorm`` for a
    ``NativeRMSNorm`` (same parameters, same names). Idempotent; a no-op when the kernels cannot be built."""
    if not decode_ops.available():
        return model
    for name, mod in list(model.named_modules()):
        if type(mod) is DecoderLayer:
            replace_module(model, name, FusedDecoderLayer(mod))
    native: dict[int, NativeRMSNorm] = {}  # a norm shared by several layers (compress share) stays one module
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if type(mod) is RMSNorm:
            replace_module(model, name, native.setdefault(id(mod), NativeRMSNorm(mod)))
    return model
