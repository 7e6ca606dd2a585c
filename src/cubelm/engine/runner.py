"""The model runner: turns a scheduled batch into flat tensors, runs the one model with the paged backend, and
returns the logits of the positions that must be sampled.

It owns the KV pool: ``(L, num_blocks * block_size, Hkv, D)`` for K and for V, in the model's dtype.
"""

from __future__ import annotations

import torch

from cubelm.engine.paged_attention import PagedAttention, PagedMetadata, PrefillChunk
from cubelm.engine.scheduler import ScheduledBatch
from cubelm.engine.sequence import Sequence
from cubelm.model.transformer import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int):
        cfg = model.config
        param = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, param.device
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=param.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=param.dtype, device=self.device)
        self.attn = PagedAttention(self.k_cache, self.v_cache, cfg.sliding_window)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, seqs: list[Sequence], num_new: list[int]):
        """Flat ids/positions (decodes first) and the paged metadata. Returns (ids, positions, meta, order) where
        ``order[i]`` is the flat index of the last new token of ``seqs[i]``."""
        decodes = [i for i, n in enumerate(num_new) if n == 1]
        prefills = [i for i, n in enumerate(num_new) if n > 1]
        ids, positions, slots, last = [], [], [], [0] * len(seqs)
        chunks = []
        for i in decodes + prefills:
            seq, n = seqs[i], num_new[i]
            start = seq.num_computed_tokens
            if n > 1:
                chunks.append(PrefillChunk(len(ids), n, torch.tensor(self._slots(seq, 0, start + n),
                                                                      device=self.device)))
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
            last[i] = len(ids) - 1
        meta = PagedMetadata(slot_mapping=torch.tensor(slots, device=self.device), num_decodes=len(decodes),
                             prefills=chunks)
        if decodes:
            meta.decode_slots, meta.decode_mask = self._decode_index([seqs[i] for i in decodes])
        as_tensor = lambda x: torch.tensor(x, device=self.device).unsqueeze(0)
        return as_tensor(ids), as_tensor(positions), meta, last

    def _decode_index(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        lens = [s.num_computed_tokens + 1 for s in seqs]
        max_blocks = -(-max(lens) // bs)
        tables = torch.tensor([s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks]))
                               for s in seqs], device=self.device)  # (S, max_blocks)
        offsets = torch.arange(bs, device=self.device)
        slots = (tables.unsqueeze(-1) * bs + offsets).flatten(1)  # (S, max_blocks * bs)
        pos = torch.arange(slots.shape[1], device=self.device)
        lens_t = torch.tensor(lens, device=self.device).unsqueeze(1)
        mask = pos < lens_t
        window = self.model.config.sliding_window
        if window is not None:
            mask &= pos > lens_t - 1 - window
        return slots, mask[:, None, None, :]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns hidden-state logits (len(batch), vocab) at each sequence's last new token."""
        ids, positions, meta, last = self.prepare(batch.seqs, batch.num_new_tokens)
        self.attn.meta = meta
        hidden = self.model.hidden_states(ids, positions, self.attn)  # (1, N, h)
        return self.model.lm_head(hidden[0, last])  # (B, vocab): only rows that may be sampled

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst across all layers (copy-on-write for forked sequences)."""
        bs = self.block_size
        for src, dst in pairs:
            self.k_cache[:, dst * bs:(dst + 1) * bs] = self.k_cache[:, src * bs:(src + 1) * bs]
            self.v_cache[:, dst * bs:(dst + 1) * bs] = self.v_cache[:, src * bs:(src + 1) * bs]
