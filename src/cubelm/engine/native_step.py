"""A decode step through every decoder layer in one native call (``kernels/decode_step.c``).

The runner uses it for steps made only of decode rows (one new token per sequence; up to ``MAX_ROWS`` of them
with fp32 weights, ``skinny_gemm.MAX_ROWS`` with int8/int4 ones) when the model is in the engine's CPU decode
layout: fp32, q/k/v and gate/up fused
into ``BlockedLinear`` GEMMs (``decode_layout``), no adapters, an fp32 or int8 paged pool, kernels available. ``build``
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
                               [_ptr] * 5 + [ctypes.c_int]) or False
    return _fn or None


def describe_linear(mod) -> tuple[list, list[torch.Tensor]] | None:
    """The C descriptor of a linear (weight, scales, bias, kind, a, b; see decode_step.c) and the tensors it points
    into, or None for a kind the native step does not run."""
    if type(mod) is BlockedLinear and mod.use_kernel:
        tensors = [mod.weight_blocks] + ([] if mod.bias is None else [mod.bias])
        return [mod.weight_blocks.data_ptr(), 0, 0 if mod.bias is None else mod.bias.data_ptr(), 0, mod.parts,
                mod.weight_blocks.shape[2]], tensors
    from cubelm.compress.quantized_linear import QuantLinear  # imports the decode layout: imported late
    if type(mod) is QuantLinear and mod.qweight.device.type == "cpu" and mod.qweight.is_contiguous() and \
            mod.scales.dtype == torch.float32 and mod.scales.is_contiguous():
        tensors = [mod.qweight, mod.scales] + ([] if mod.bias is None else [mod.bias])
        return [mod.qweight.data_ptr(), mod.scales.data_ptr(), 0 if mod.bias is None else mod.bias.data_ptr(),
                1 if mod.method == "int8" else 2, 0, mod.group_size or 0], tensors
    return None


class NativeDecodeStep:
    # fp32 weights: any batch a decode step can have (more than 8 rows take blocked_gemm.c, as BlockedLinear
    # does); int8/int4 weights: qgemm's few-row range (more rows dequantize to a float matmul in the module path)
    MAX_ROWS = 1024
    QUANTIZED_MAX_ROWS = skinny_gemm.MAX_ROWS

    def __init__(self, model, pool, block_size: int, table: list[list[int]], keep: list[torch.Tensor], eps: float,
                 max_rows: int):
        cfg = model.config
        self.model, self.pool, self._keep = model, pool, keep
        k_cache = pool.k
        D = cfg.head_dim
        self.eps, self.scale = eps, D ** -0.5
        self.dims = torch.tensor([cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, D,
                                  cfg.intermediate_size, len(table), block_size, cfg.sliding_window or 0,
                                  k_cache.shape[1]], dtype=torch.int64)
        self.ptrs = torch.tensor(table, dtype=torch.int64)
        self.per_row = 2 * cfg.hidden_size + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + \
            2 * cfg.num_attention_heads * D + 3 * cfg.intermediate_size
        self.max_rows = max_rows  # the runner sends decode-only steps of at most this many rows
        self.scratch = torch.empty(0, dtype=torch.float32)  # grown to the largest step seen

    @classmethod
    def build(cls, model, pool, block_size: int) -> "NativeDecodeStep | None":
        """The native step for this model and KV pool (``cubelm.engine.kv_cache.KVPool``: fp32, or int8 codes with
        fp32 scales), or None when any layer or the pool is not in its form."""
        cfg = getattr(model, "config", None)
        layers = getattr(getattr(model, "model", None), "layers", None)
        store = torch.int8 if pool.quantized else torch.float32
        if not layers or pool.k.dtype != store or pool.dtype != torch.float32 or pool.k.device.type != "cpu" or \
                not (pool.k.is_contiguous() and pool.v.is_contiguous()) or _load() is None:
            return None
        table, keep, eps, kinds = [], [], set(), set()
        q_n, kv_n = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        for layer in layers:
            if type(layer) is not FusedDecoderLayer:
                return None
            sa, mlp, norms = layer.self_attn, layer.mlp, (layer.input_layernorm, layer.post_attention_layernorm)
            linears = (_shared_fused(sa.q_proj, sa.k_proj, sa.v_proj), sa.o_proj,
                       _shared_fused(mlp.gate_proj, mlp.up_proj), mlp.down_proj)
            shapes = [(cfg.hidden_size, q_n + 2 * kv_n), (q_n, cfg.hidden_size),
                      (cfg.hidden_size, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)]
            row = [n.weight.data_ptr() for n in norms]
            keep.extend(n.weight for n in norms)
            for mod, (k, n) in zip(linears, shapes):
                desc = None if mod is None else describe_linear(mod)
                if desc is None or (mod.in_features, mod.out_features) != (k, n):
                    return None
                row.extend(desc[0])
                keep.extend(desc[1])
                kinds.add(desc[0][3])
            if any(n.weight.dtype != torch.float32 for n in norms):
                return None
            eps.update(float(n.eps) for n in norms)
            table.append(row)
        if len(eps) != 1:
            return None  # norms with different eps: the call takes one
        max_rows = cls.MAX_ROWS if kinds == {0} else cls.QUANTIZED_MAX_ROWS
        return cls(model, pool, block_size, table, keep, eps.pop(), max_rows)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """ids, positions (1, S) of S decode rows -> final hidden states (1, S, hidden), K/V written."""
        inner = self.model.model
        x = inner.embed_tokens(ids)  # (1, S, hidden), a new tensor: updated in place below
        cos, sin = inner.rotary_emb(positions, x.dtype)
        S = ids.shape[1]
        if self.scratch.numel() < S * self.per_row:
            self.scratch = torch.empty(S * self.per_row, dtype=torch.float32)
        cos, sin = cos.reshape(S, -1).contiguous(), sin.reshape(S, -1).contiguous()
        tables, lens, slots = meta.decode_tables, meta.decode_lens, meta.slot_mapping
        pool = self.pool
        scales = (pool.k_scale.data_ptr(), pool.v_scale.data_ptr()) if pool.quantized else (None, None)
        failed = _fn(self.dims.data_ptr(), self.ptrs.data_ptr(), self.eps, self.scale, x.data_ptr(), cos.data_ptr(),
                     sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), S, tables.shape[1],
                     pool.k.data_ptr(), pool.v.data_ptr(), scales[0], scales[1], self.scratch.data_ptr(),
                     torch.get_num_threads())
        if failed == 1:
            raise MemoryError("decode step: out of memory for the attention's score or the GEMMs' packing buffers")
        if failed:
            raise RuntimeError(f"decode step: kernel error {failed} (a linear kind decode_step.c does not know)")
        return inner.norm(x)
