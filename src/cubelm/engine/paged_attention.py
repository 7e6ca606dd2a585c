"""The paged attention backend: K/V live in a pool of fixed-size blocks; each step's tokens come as one flat batch.

The cache is two tensors per layer, ``(num_blocks * block_size, Hkv, D)``; token slot = block_id * block_size +
offset. A step's flat batch puts the single-token sequences (decodes) first, then prompt chunks. Each layer
writes the step's new K/V with one ``index_copy_`` at ``slot_mapping``, then
* decodes: gathers every decode sequence's context by a (S, max_len) slot index and runs one batched SDPA with a
  length mask (GQA by folding query-head groups into the query axis);
* prompt chunks: per chunk, gathers its context (cached prefix + earlier chunks + itself) and runs causal SDPA
  with the chunk's queries offset to their absolute positions.
The metadata is built once per step by the runner and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cubelm.model.attention import causal_mask


@dataclass(slots=True)
class PrefillChunk:
    start: int  # offset of the chunk's first query in the flat batch
    num_tokens: int
    context_slots: torch.Tensor  # (context_len,) slots of every key the chunk attends to, in position order


@dataclass(slots=True)
class PagedMetadata:
    slot_mapping: torch.Tensor  # (N,) where each new token's K/V goes
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # (S, max_len) context slots per decode sequence (padded)
    decode_mask: torch.Tensor | None = None  # (S, 1, 1, max_len) True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)


class PagedAttention:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_heads: int,
                 sliding_window: int | None = None):
        self.k_cache, self.v_cache = k_cache, v_cache  # (L, num_slots, Hkv, D)
        self.sliding_window = sliding_window
        # a Python bool fixed at construction: derived from shapes, torch.compile(dynamic=True) would make it symbolic
        self.gqa = num_heads != k_cache.shape[2]
        self.meta: PagedMetadata | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        kc.index_copy_(0, meta.slot_mapping, k[0])
        vc.index_copy_(0, meta.slot_mapping, v[0])
        q = q[0]  # (N, Hq, D)
        gqa = self.gqa
        parts = []
        if meta.num_decodes:
            S = meta.num_decodes
            Hkv, D = kc.shape[1], kc.shape[2]
            kd = kc[meta.decode_slots].transpose(1, 2)  # (S, Hkv, max_len, D)
            vd = vc[meta.decode_slots].transpose(1, 2)
            # One query per sequence: fold each KV head's group of query heads into the query-length axis,
            # (S, Hq, D) -> (S, Hkv, G, D), so GQA is a plain batched attention with no K/V repetition.
            qd = q[:S].reshape(S, Hkv, -1, D)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask)
            parts.append(out.reshape(S, -1, D))  # (S, Hq, D)
        for chunk in meta.prefills:
            qp = q[chunk.start:chunk.start + chunk.num_tokens].transpose(0, 1).unsqueeze(0)  # (1, Hq, T, D)
            kp = kc[chunk.context_slots].transpose(0, 1).unsqueeze(0)  # (1, Hkv, C, D)
            vp = vc[chunk.context_slots].transpose(0, 1).unsqueeze(0)
            T, C = qp.shape[2], kp.shape[2]
            if T == C and self.sliding_window is None:
                out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=T > 1, enable_gqa=gqa)
            else:
                mask = causal_mask(T, C, self.sliding_window, q.device)
                out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
            parts.append(out[0].transpose(0, 1))  # (T, Hq, D)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).unsqueeze(0)
