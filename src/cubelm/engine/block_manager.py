"""Paged KV cache bookkeeping: fixed-size blocks, block tables, reference counts and prefix caching.

A full block is identified by a chained hash ``hash((parent_hash, its token ids))``, so equal hashes mean equal
prefixes; a hit is still verified against the stored token ids (a hash collision must never serve wrong K/V).
Freed blocks keep their contents and hash and sit in an LRU list: a later request with the same prefix revives
them; allocation takes the least recently freed block and forgets its hash. Pure Python, no tensors: the runner
owns the K/V memory, this class only decides which slots a sequence uses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cubelm.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front = LRU
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = self.prefix_hits = 0  # in tokens, for metrics

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- prefix cache ----------------------------------------------------------------------------------------
    def _chain(self, token_ids: list[int], num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        out, parent, bs = [], None, self.block_size
        for i in range(num_blocks):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = hash((parent, tokens))
            out.append((parent, tokens))
        return out

    def allocate_prefix(self, seq: Sequence) -> None:
        """Admit a waiting sequence: reuse cached blocks for the longest matching prefix of its tokens.

        At least one token is left to compute (its logits are needed), and the block holding it is never a shared
        one, so a sequence only ever writes into blocks it owns alone.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_tokens
        for block_hash, tokens in self._chain(seq.token_ids, max_blocks):
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += seq.num_cached_tokens

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of the sequence's blocks that became full (call after their K/V are written).

        Incremental: ``seq.block_hashes`` caches the chain, so each step hashes only newly filled blocks."""
        if not self.enable_prefix_caching:
            return
        num_full, bs = seq.num_computed_tokens // self.block_size, self.block_size
        del seq.block_hashes[num_full:]  # after a rollback (speculative decoding) or a preemption
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = hash((parent, tokens))
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids = parent, tokens
                self.hash_to_block.setdefault(parent, block.block_id)

    # ---- allocation --------------------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict: its contents are about to be overwritten
                if self.hash_to_block.get(block.block_hash) == block_id:
                    del self.hash_to_block[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks reaching zero go to the LRU end (tail first, so a shared
        prefix's head blocks stay cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached blocks are reused first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_whole(self) -> None:
        """Invariant once nothing runs: every block is free and no reference is left."""
        leaked = [b.block_id for b in self.blocks if b.ref_count]
        assert not leaked and self.num_free_blocks == self.num_blocks, f"leaked blocks {leaked[:8]}"
