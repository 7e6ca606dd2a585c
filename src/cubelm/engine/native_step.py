"""A decode step through every decoder layer in one native call (``kernels/decode_step.c``).

The runner uses it for steps made only of decode rows (one new token per sequence, at most
``skinny_gemm.MAX_ROWS`` of them) when the model is in the engine's CPU decode layout: fp32, q/k/v and gate/up fused
into ``BlockedLinear`` GEMMs (``decode_layout``), no adapters, an fp32 paged pool, kernels available. ``build``
returns None for any other model, and the module path (``FusedDecoderLayer``) runs as before.

What stays in Python per step: the embedding lookup, the RoPE tables, the final norm and the output head (each one
call), and the metadata the runner builds anyway. Everything a layer does is in the call, with the weights'
pointers and shapes tabled once here: the table holds raw addresses, so it keeps the weight tensors alive
(``self._keep``) and is valid only while the model's tensors are not replaced (the engine owns its model).
"""

from __future__ import annotations

import ctypes

import torch

from cubelm.engine import kernels
from cubelm.engine.decode_layout import BlockedLinear
from cubelm.engine.fused_decode import FusedDecoderLayer, _shared_fused
from cubelm.engine.kernels import skinny_gemm

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_fn = None


def _load():
    global _fn
    if _fn is None:
        _fn = kernels.function("decode_step", "decode_layers",
                               [_ptr, _ptr, ctypes.c_float, ctypes.c_float] + [_ptr] * 6 + [_i64, _i64] +
                               [_ptr] * 3 + [ctypes.c_int]) or False
    return _fn or None


def _blocked(mod) -> BlockedLinear | None:
    return mod if type(mod) is BlockedLinear and mod.use_kernel else None


class NativeDecodeStep:
    MAX_ROWS = skinny_gemm.MAX_ROWS

    def __init__(self, model, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int, layers: list):
        cfg = model.config
        self.model, self.k_cache, self.v_cache = model, k_cache, v_cache
        D = cfg.head_dim
        first = layers[0]
        self.eps, self.scale = float(first[0].input_layernorm.eps), D ** -0.5
        qkv0, o0, gu0, down0 = first[1:]
        self.dims = torch.tensor([cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, D,
                                  cfg.intermediate_size, len(layers), block_size, cfg.sliding_window or 0,
                                  k_cache.shape[1], qkv0.parts, qkv0.weight_blocks.shape[2], o0.parts,
                                  o0.weight_blocks.shape[2], gu0.parts, gu0.weight_blocks.shape[2], down0.parts,
                                  down0.weight_blocks.shape[2]], dtype=torch.int64)
        rows, self._keep = [], []
        for layer, qkv, o, gu, down in layers:
            tensors = [layer.input_layernorm.weight, qkv.weight_blocks, qkv.bias, o.weight_blocks, o.bias,
                       layer.post_attention_layernorm.weight, gu.weight_blocks, gu.bias, down.weight_blocks,
                       down.bias]
            rows.append([0 if t is None else t.data_ptr() for t in tensors])
            self._keep.extend(t for t in tensors if t is not None)
        self.ptrs = torch.tensor(rows, dtype=torch.int64)
        per_row = 2 * cfg.hidden_size + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + \
            2 * cfg.num_attention_heads * D + 3 * cfg.intermediate_size
        self.scratch = torch.empty(self.MAX_ROWS * per_row, dtype=torch.float32)

    @classmethod
    def build(cls, model, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int) -> "NativeDecodeStep | None":
        """The native step for this model and pool, or None when any layer or the pool is not in its form."""
        layers_mod = getattr(getattr(model, "model", None), "layers", None)
        if not layers_mod or k_cache.dtype != torch.float32 or k_cache.device.type != "cpu" or \
                not k_cache.is_contiguous() or not v_cache.is_contiguous() or _load() is None:
            return None
        layers, shapes = [], set()
        for layer in layers_mod:
            if type(layer) is not FusedDecoderLayer:
                return None
            sa, mlp = layer.self_attn, layer.mlp
            mods = (_shared_fused(sa.q_proj, sa.k_proj, sa.v_proj), _blocked(sa.o_proj),
                    _shared_fused(mlp.gate_proj, mlp.up_proj), _blocked(mlp.down_proj))
            if not all(_blocked(m) for m in mods) or layer.input_layernorm.weight.dtype != torch.float32:
                return None
            if mods[0].out_features != (sa.num_heads + 2 * sa.num_kv_heads) * sa.head_dim or \
                    mods[2].out_features != 2 * mods[3].in_features:
                return None
            shapes.add(tuple((m.parts, m.weight_blocks.shape[2], m.bias is None) for m in mods))
            layers.append((layer, *mods))
        if len(shapes) != 1 or len({float(layer.input_layernorm.eps) for layer, *_ in layers} |
                                   {float(layer.post_attention_layernorm.eps) for layer, *_ in layers}) != 1:
            return None  # per-layer shapes or norms differ: not what the table describes
        return cls(model, k_cache, v_cache, block_size, layers)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """ids, positions (1, S) of S decode rows -> final hidden states (1, S, hidden), K/V written."""
        inner = self.model.model
        x = inner.embed_tokens(ids)  # (1, S, hidden), a new tensor: updated in place below
        cos, sin = inner.rotary_emb(positions, x.dtype)
        S = ids.shape[1]
        cos, sin = cos.reshape(S, -1).contiguous(), sin.reshape(S, -1).contiguous()
        tables, lens, slots = meta.decode_tables, meta.decode_lens, meta.slot_mapping
        failed = _fn(self.dims.data_ptr(), self.ptrs.data_ptr(), self.eps, self.scale, x.data_ptr(), cos.data_ptr(),
                     sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), S, tables.shape[1],
                     self.k_cache.data_ptr(), self.v_cache.data_ptr(), self.scratch.data_ptr(),
                     torch.get_num_threads())
        if failed:
            raise MemoryError("decode step: out of memory for the attention's score buffers")
        return inner.norm(x)
