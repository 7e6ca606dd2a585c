"""The model runner: turns a scheduled batch into flat tensors, runs the one model with the paged backend, and
returns the logits of the positions that must be sampled.

It owns the KV pool (``cubelm.engine.kv_cache.KVPool``): ``(L, num_blocks * block_size, Hkv, D)`` for K and for
V, in the model's dtype, or int8 with an fp32 scale per token and KV head (``kv_cache_dtype="int8"``). With
adapters (multi-LoRA), each row's slot comes in ``lora_slots``: the runner puts the rows of one slot next to each
other (decodes sorted by slot, then prompt chunks sorted by slot) and hands the batched LoRA layers their
segments through the shared ``LoRAContext``, as it hands the paged attention its metadata.
"""

from __future__ import annotations

import torch

from cubelm.engine.kv_cache import KVPool
from cubelm.engine.lora.layers import LoRAContext
from cubelm.engine.paged_attention import PagedAttention, PagedMetadata, PrefillChunk
from cubelm.engine.sequence import Sequence
from cubelm.model.transformer import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, *, compile_model: bool = False,
                 lora_context: LoRAContext | None = None, native_step: bool = True, kv_cache_dtype: str = "auto"):
        cfg = model.config
        self.lora_context = lora_context
        param = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, param.device
        self.kv_pool = KVPool(cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim,
                              dtype=param.dtype, device=self.device, kv_cache_dtype=kv_cache_dtype)
        self.k_cache, self.v_cache = self.kv_pool.k, self.kv_pool.v
        self.attn = PagedAttention(self.kv_pool, num_heads=cfg.num_attention_heads, block_size=block_size,
                                   sliding_window=cfg.sliding_window)
        # Decode-only steps can be compiled: dynamic=True because context lengths change every step, and the KV
        # write is an index_copy_ at tensor slots, so a new position is new data, not a new graph. Steps with
        # prompt chunks stay eager (their per-chunk Python loop would only fragment the graph).
        self.compiled = compile_model
        self.decode_hidden_states = (torch.compile(model.hidden_states, dynamic=True) if compile_model
                                     else model.hidden_states)
        # Steps of a few decode rows run every layer in one native call when the model is in the CPU decode layout
        # (cubelm.engine.native_step); None otherwise (adapters, other dtypes or devices, compile, no compiler).
        self.native_step = None
        if native_step and not compile_model and lora_context is None and self.attn.use_kernel:
            from cubelm.engine.native_step import NativeDecodeStep
            self.native_step = NativeDecodeStep.build(model, self.kv_pool, block_size)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, seqs: list[Sequence], num_new: list[int], starts: list[int] | None = None,
                lora_slots: list[int] | None = None):
        """Flat ids/positions (decodes first) and the paged metadata. Returns (ids, positions, meta, first) where
        ``first[i]`` is the flat index of the first new token of ``seqs[i]``. ``starts`` defaults to each
        sequence's ``num_computed_tokens`` (a draft model passes its own)."""
        starts = starts if starts is not None else [s.num_computed_tokens for s in seqs]
        decodes = [i for i, n in enumerate(num_new) if n == 1]
        prefills = [i for i, n in enumerate(num_new) if n > 1]
        if lora_slots is not None:  # stable: rows of one adapter contiguous, order otherwise unchanged
            decodes.sort(key=lora_slots.__getitem__)
            prefills.sort(key=lora_slots.__getitem__)
        if self.lora_context is not None:
            self.lora_context.set(_segments(decodes + prefills, num_new, lora_slots))
        ids, positions, slots, first = [], [], [], [0] * len(seqs)
        chunks = []
        for i in decodes + prefills:
            seq, n, start = seqs[i], num_new[i], starts[i]
            first[i] = len(ids)
            if n > 1:
                chunks.append(PrefillChunk(len(ids), n, torch.tensor(self._slots(seq, 0, start + n),
                                                                      device=self.device)))
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq, start, start + n))
        meta = PagedMetadata(slot_mapping=torch.tensor(slots, device=self.device), num_decodes=len(decodes),
                             prefills=chunks)
        if decodes:
            self._decode_index(meta, [seqs[i] for i in decodes], [starts[i] + 1 for i in decodes])
        as_tensor = lambda x: torch.tensor(x, device=self.device).unsqueeze(0)
        return as_tensor(ids), as_tensor(positions), meta, first

    def _decode_index(self, meta: PagedMetadata, seqs: list[Sequence], lens: list[int]) -> None:
        """Block tables (S, max_blocks) and lengths for the decode rows; the gather path also gets flat block ids
        and a length mask (the kernel path reads the tables directly)."""
        bs = self.block_size
        max_blocks = -(-max(lens) // bs)
        tables = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks])) for s in seqs]
        meta.decode_tables = torch.tensor(tables, device=self.device)  # padding = block 0, never read
        meta.decode_lens = torch.tensor(lens, device=self.device)
        if self.attn.use_kernel and not self.compiled:
            return
        meta.decode_blocks = meta.decode_tables.flatten()
        pos = torch.arange(max_blocks * bs, device=self.device)
        lens_t = meta.decode_lens.unsqueeze(1)
        mask = pos < lens_t
        window = self.model.config.sliding_window
        if window is not None:
            mask &= pos > lens_t - 1 - window
        meta.decode_mask = mask[:, None, None, :]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int], *, starts: list[int] | None = None,
            full: frozenset[int] = frozenset(), lora_slots: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Logits at each sequence's last new token, or at all its new tokens for rows in ``full`` (speculative
        verification). Returns (logits (R, vocab), offsets) with sequence i's rows starting at ``offsets[i]``.
        ``lora_slots[i]`` is the adapter slot of ``seqs[i]`` (-1 = base model)."""
        ids, positions, meta, first = self.prepare(seqs, num_new, starts, lora_slots)
        self.attn.meta = meta
        if self.native_step is not None and not meta.prefills and meta.num_decodes <= self.native_step.max_rows:
            hidden = self.native_step(ids, positions, meta)
        else:
            forward = self.model.hidden_states if meta.prefills else self.decode_hidden_states
            hidden = forward(ids, positions, self.attn)  # (1, N, h)
        rows, offsets = [], []
        for i, n in enumerate(num_new):
            offsets.append(len(rows))
            rows.extend(range(first[i], first[i] + n) if i in full else [first[i] + n - 1])
        return self.model.lm_head(hidden[0, rows]), offsets  # only rows that may be sampled


def _segments(order: list[int], num_new: list[int], slots: list[int] | None) -> list[tuple[int, int, int]]:
    """(slot, first row, end row) of each run of adapter rows in the flat batch built in ``order``."""
    segments: list[tuple[int, int, int]] = []
    if slots is None:
        return segments
    row = 0
    for i in order:
        slot, n = slots[i], num_new[i]
        if slot >= 0:
            if segments and segments[-1][0] == slot and segments[-1][2] == row:
                segments[-1] = (slot, segments[-1][1], row + n)
            else:
                segments.append((slot, row, row + n))
        row += n
    return segments
