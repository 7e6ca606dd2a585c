"""Attention: the projection module, and pluggable backends that decide where K/V live.

The model never branches on "training / cached generation / paged engine": every ``Attention`` layer computes
q, k, v and RoPE, then hands them to a backend object passed into ``forward``:

* ``CausalAttention`` — no cache: full causal attention over the given tokens (training, scoring).
* ``KVCache`` — the reference contiguous cache used by ``cubelm generate``: prefill, then decode.
* the engine's paged backend (``cubelm.engine``) plugs in the same way with block tables and slot mappings.

A backend is any callable ``backend(layer_idx, q, k, v) -> out`` with q ``(B, T, Hq, D)``, k/v
``(B, T, Hkv, D)`` and out ``(B, T, Hq, D)``. GQA/MQA is handled by SDPA's ``enable_gqa`` (no K/V copies).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.layers import apply_rope


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_mask(num_queries: int, num_keys: int, sliding_window: int | None, device) -> torch.Tensor:
    """Boolean (T, S) mask, True = attend. Query i sits at absolute position i + (S - T)."""
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + (num_keys - num_queries)
    k_pos = torch.arange(num_keys, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window  # HF semantics: the query plus sliding_window - 1 earlier keys
    return mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of T queries over S >= T keys whose last T are the queries' own positions."""
    T, S = q.shape[1], k.shape[1]
    if T == 1 and (sliding_window is None or S <= sliding_window):
        # decode: fold each KV head's query-head group into the query axis, (B, 1, Hq, D) -> (B, Hkv, G, D),
        # so GQA needs neither K/V repetition nor SDPA's enable_gqa path (slow for tiny queries on CPU)
        B, _, Hq, D = q.shape
        out = F.scaled_dot_product_attention(q.reshape(B, k.shape[2], -1, D), k.transpose(1, 2), v.transpose(1, 2))
        return out.reshape(B, 1, Hq, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, D)
    gqa = q.shape[1] != k.shape[1]
    if T == S and (sliding_window is None or S <= sliding_window):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    else:
        mask = causal_mask(T, S, sliding_window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, T, Hq, D)


class CausalAttention:
    """No cache: each forward attends causally within its own tokens."""

    def __init__(self, sliding_window: int | None = None):
        self.sliding_window = sliding_window

    def __call__(self, layer_idx, q, k, v):
        return sdpa(q, k, v, self.sliding_window)


class KVCache:
    """Contiguous per-layer K/V buffers ``(L, B, max_len, Hkv, D)`` for the reference generator.

    Call ``step(num_new_tokens)`` once before each forward: every layer then writes its new K/V at
    ``[start, length)`` and attends over ``[0, length)``.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.sliding_window = max_len, cfg.sliding_window
        self.start = self.length = 0

    def step(self, num_new_tokens: int) -> None:
        if self.length + num_new_tokens > self.max_len:
            raise CubelmError(f"KV cache full: {self.length} + {num_new_tokens} tokens exceed its "
                              f"{self.max_len} slots; lower --max-new-tokens or shorten the prompt")
        self.start, self.length = self.length, self.length + num_new_tokens

    def __call__(self, layer_idx, q, k, v):
        self.k[layer_idx, :, self.start:self.length] = k
        self.v[layer_idx, :, self.start:self.length] = v
        return sdpa(q, self.k[layer_idx, :, :self.length], self.v[layer_idx, :, :self.length], self.sliding_window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn(self.layer_idx, q, k, v)  # (B, T, Hq, D)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))
